"""Experiment tracking (``--report-to``): TensorBoard through ``torch.utils.tensorboard`` or Weights &
Biases, both optional packages (checked up front by :meth:`TrainConfig.validate`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


class Reporter:
    """``--report-to none``: records nothing."""

    package = None  # the optional package a reporter needs

    def log(self, scalars: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter(Reporter):
    package = "tensorboard"

    def __init__(self, out_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{config}\n```")

    def log(self, scalars, step):
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self):
        self.writer.close()


class WandbReporter(Reporter):
    package = "wandb"

    def __init__(self, out_dir: Path, config: dict):
        import wandb
        self.wandb = wandb
        self.wandb_run = wandb.init(project="ptv2", name=out_dir.name, dir=str(out_dir), config=config)

    def log(self, scalars, step):
        self.wandb_run.log(scalars, step=step)

    def close(self):
        self.wandb_run.finish()


REPORTERS = {"none": Reporter, "tensorboard": TensorBoardReporter, "wandb": WandbReporter}


def make_reporter(kind: str, out_dir: Path, config: dict) -> Reporter:
    return Reporter() if kind == "none" else REPORTERS[kind](out_dir, config)


def missing_package(kind: str):
    """The package ``--report-to kind`` needs when it is not installed, else None."""
    package = REPORTERS[kind].package
    if package is None or package in sys.modules or importlib.util.find_spec(package) is not None:
        return None
    return package


def numbers(prefix: str, values: dict) -> dict:
    """The finite numbers of ``values`` as ``prefix/name`` scalars."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
