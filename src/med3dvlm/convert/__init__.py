"""Converters from the original Med3DVLM / DCFormer checkpoints to med3dvlm checkpoints."""

from .dcformer import convert_dcformer_checkpoint, convert_dcformer_state_dict, load_state_dict
from .projector import convert_projector_checkpoint, convert_projector_state_dict
from .siglip import convert_siglip_checkpoint, convert_siglip_state_dict

__all__ = [
    "convert_dcformer_checkpoint",
    "convert_dcformer_state_dict",
    "convert_projector_checkpoint",
    "convert_projector_state_dict",
    "convert_siglip_checkpoint",
    "convert_siglip_state_dict",
    "load_state_dict",
]
