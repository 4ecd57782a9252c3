"""The training engine's public names, in one place: the loop, its checkpoint store, data order and signals.

The code lives in `loop` (Trainer, TrainConfig), `checkpoints`, `sampling` and `signals`; this module
re-exports it so `from med3dvlm.train.engine import Trainer, TrainConfig, ...` keeps working.
"""

from .checkpoints import CHECKPOINT_DIR, STATE_NAME, latest_checkpoint, list_checkpoints, read_trainer_state
from .loop import TrainConfig, Trainer, TrainResult, default_param_groups, train
from .sampling import EpochSampler, EpochSeededDataset, sample_indices, seed_everything

__all__ = [
    "CHECKPOINT_DIR",
    "STATE_NAME",
    "EpochSampler",
    "EpochSeededDataset",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "default_param_groups",
    "latest_checkpoint",
    "list_checkpoints",
    "read_trainer_state",
    "sample_indices",
    "seed_everything",
    "train",
]
