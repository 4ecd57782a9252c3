"""ViT3D: the 3D Vision Transformer of M3D (Bai et al., 2024), the baseline encoder of Med3DVLM.

Built from MONAI blocks: a learned linear patch embedding with a learned position embedding, a cls token,
pre-norm transformer blocks without qkv bias, and a final LayerNorm. `vit3d_base` is M3D's encoder:
patch (4, 16, 16) on 32x256x256, width 768, 12 layers, 12 heads; 87,389,184 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from torch import nn

from ..config import ModelConfig
from ..hub import PretrainedModel
from ..registry import register_family, register_model


@dataclass
class ViT3DConfig(ModelConfig):
    model_type = "vit3d"

    in_channels: int = 1
    input_size: tuple[int, int, int] = (32, 256, 256)  # (D, H, W); the position embedding is sized for it
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for size, patch in zip(self.input_size, self.patch_size):
            if size % patch:
                raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.input_size, self.patch_size))  # type: ignore[return-value]


@register_family(ViT3DConfig)
class ViT3D(PretrainedModel):
    """`forward` returns one output: the final tokens (B, 1 + N, C), the cls token first, then the
    patches in depth-major order."""

    num_prefix_tokens = 1

    def __init__(self, config: ViT3DConfig) -> None:
        super().__init__(config)
        c = config
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=c.in_channels,
            img_size=c.input_size,
            patch_size=c.patch_size,
            hidden_size=c.hidden_size,
            num_heads=c.num_heads,
            proj_type="perceptron",  # M3D's choice; keeps its parameter names
            pos_embed_type="learnable",
            dropout_rate=0.0,
            spatial_dims=3,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.blocks = nn.ModuleList(
            TransformerBlock(c.hidden_size, c.mlp_dim, c.num_heads, 0.0, qkv_bias=c.qkv_bias, use_flash_attention=True)
            for _ in range(c.num_layers)
        )
        for block in self.blocks:
            # MONAI >= 1.4 always builds this LayerNorm, used only with cross-attention. M3D's MONAI did not
            # have it; dropping it keeps the parameter count (and the state dict) equal to M3D's.
            block.norm_cross_attn = nn.Identity()
        self.norm = nn.LayerNorm(c.hidden_size)

    @property
    def output_dims(self) -> list[int]:
        return [self.config.hidden_size]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        expected = (self.config.in_channels, *self.config.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"ViT3D has a fixed position embedding: expected input (B, {expected}), got {tuple(x.shape)}")
        x = self.patch_embedding(x)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return [self.norm(x)]


@register_model
def vit3d_test() -> ViT3DConfig:
    return ViT3DConfig(input_size=(16, 32, 32), patch_size=(4, 8, 8), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)


@register_model
def vit3d_base() -> ViT3DConfig:
    """M3D's ViT3D at 32x256x256: 87,389,184 parameters."""
    return ViT3DConfig()
