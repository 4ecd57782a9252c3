"""Model families; importing this package registers every named model."""

from .dcformer import DCFormer, DCFormerConfig
from .projector import Projector, ProjectorConfig
from .vit3d import ViT3D, ViT3DConfig
from .vlm import Med3DVLM, VLMConfig

__all__ = ["DCFormer", "DCFormerConfig", "Projector", "ProjectorConfig", "ViT3D", "ViT3DConfig", "Med3DVLM", "VLMConfig"]
