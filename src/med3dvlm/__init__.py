"""med3dvlm: 3D medical vision-language models (Med3DVLM, Xin et al., IEEE JBHI 2025), re-implemented."""

from . import models  # noqa: F401  (fills the registry: each model module registers its names)
from .config import ModelConfig
from .hub import PretrainedModel
from .loading import from_pretrained
from .registry import create_model, get_config, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "PretrainedModel",
    "create_model",
    "from_pretrained",
    "get_config",
    "list_models",
    "register_model",
    "__version__",
]
