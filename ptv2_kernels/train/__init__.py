"""Training loop and the ``ptv2`` command line.

    from ptv2_kernels.train import TrainConfig, train
    result = train(TrainConfig(task="cb", epochs=3))   # or TrainConfig.from_recipe("rte-roberta-large")
    result.metrics["best_metrics"]
"""

from .config import TrainConfig, default_model
from .recipes import RECIPES, get_recipe
from .trainer import TrainResult, TrainingDiverged, build_model, evaluate, train

__all__ = ["TrainConfig", "train", "TrainResult", "TrainingDiverged", "RECIPES", "get_recipe", "build_model",
           "evaluate", "default_model"]
