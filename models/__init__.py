"""Pure-PyTorch Perceiver, Perceiver IO and Hierarchical Perceiver (HiP) models.

Only torch is imported here: no Ray, MLflow or file I/O.
"""

from models.heads import Classifier
from models.hip import HiP, LevelSpec
from models.mae import MaskedAutoencoder
from models.perceiver import Perceiver, PerceiverIO
from models.registry import (
    PRESETS,
    count_parameters,
    create_model,
    load_mae_weights,
)

__all__ = [
    "PRESETS",
    "Classifier",
    "HiP",
    "LevelSpec",
    "MaskedAutoencoder",
    "Perceiver",
    "PerceiverIO",
    "count_parameters",
    "create_model",
    "load_mae_weights",
]
