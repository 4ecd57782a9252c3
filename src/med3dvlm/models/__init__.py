"""Model families; importing this package registers every named model."""

from .dcformer import DCFormer, DCFormerConfig
from .vit3d import ViT3D, ViT3DConfig

__all__ = ["DCFormer", "DCFormerConfig", "ViT3D", "ViT3DConfig"]
