"""Training: a generic Accelerate loop (`engine`), YAML recipes (`config`) and the stage entry points.

Stage 1 (contrastive DCFormer-SigLIP pre-training) is `med3dvlm.train.clip`; stages 2 and 3 plug their own
task module and dataset into the same `Trainer`.
"""

from .config import RecipeError, apply_overrides, load_recipe, section_from_dict
from .engine import (
    EpochSampler,
    EpochSeededDataset,
    TrainConfig,
    Trainer,
    TrainResult,
    default_param_groups,
    latest_checkpoint,
    list_checkpoints,
    train,
)

__all__ = [
    "EpochSampler",
    "EpochSeededDataset",
    "RecipeError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "apply_overrides",
    "default_param_groups",
    "latest_checkpoint",
    "list_checkpoints",
    "load_recipe",
    "section_from_dict",
    "train",
]
