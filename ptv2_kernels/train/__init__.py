"""Training loop and the ``ptv2`` command line.

    from ptv2_kernels.train import TrainConfig, train
    result = train(TrainConfig(task="cb", epochs=3))   # or TrainConfig.from_recipe("rte-roberta-large")
    result.metrics["best_metrics"]
"""

from .._lazy import lazy_exports

# each name is imported from its module at first use: the command line (train/cli.py) checks every flag
# before torch and transformers load
_HOME = {
    **dict.fromkeys(("ConfigError", "TrainConfig", "default_model", "model_location"), ".config"),
    **dict.fromkeys(("RECIPES", "get_recipe"), ".recipes"),
    **dict.fromkeys(("Run", "TrainResult", "TrainingDiverged", "build_model", "evaluate", "train"), ".trainer"),
}
__all__ = ["TrainConfig", "ConfigError", "train", "Run", "TrainResult", "TrainingDiverged", "RECIPES", "get_recipe",
           "build_model", "evaluate", "default_model", "model_location"]

__getattr__, __dir__ = lazy_exports(__name__, _HOME)
