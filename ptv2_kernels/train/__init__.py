"""Training loop and the ``ptv2`` command line.

    from ptv2_kernels.train import TrainConfig, train
    result = train(TrainConfig(task="cb", epochs=3))   # or TrainConfig.from_recipe("rte-roberta-large")
    result.metrics["best_metrics"]
"""

from .config import ConfigError, TrainConfig, default_model, model_location
from .recipes import RECIPES, get_recipe
from .trainer import Run, TrainResult, TrainingDiverged, build_model, evaluate, train

__all__ = ["TrainConfig", "ConfigError", "train", "Run", "TrainResult", "TrainingDiverged", "RECIPES", "get_recipe",
           "build_model", "evaluate", "default_model", "model_location"]
