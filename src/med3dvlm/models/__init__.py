"""Model families; importing this package registers every named model."""

from .clip import Contrastive3D, ContrastiveConfig
from .dcformer import DCFormer, DCFormerConfig
from .projector import Projector, ProjectorConfig
from .text import TextTower
from .vit3d import ViT3D, ViT3DConfig
from .vlm import Med3DVLM, VLMConfig

__all__ = ["Contrastive3D", "ContrastiveConfig", "TextTower", "DCFormer", "DCFormerConfig", "Projector", "ProjectorConfig", "ViT3D", "ViT3DConfig", "Med3DVLM", "VLMConfig"]
