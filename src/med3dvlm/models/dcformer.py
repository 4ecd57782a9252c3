"""DCFormer: a 3D MetaFormer whose token mixer is a decomposed depthwise convolution.

Ates et al., "DCFormer: Efficient 3D Vision-Language Modeling with Decomposed Convolutions", 2025;
the vision encoder of Med3DVLM (Xin et al., IEEE JBHI 2025). Structure, exactly as the released code:

- stem: four decomposed convolutions (1->C0 with kernel 7 and stride 4, then three C0->C0 with kernel 3),
  each branch with its own BatchNorm and no activation anywhere (the original passes its GELU into the
  norm slot, so none is applied);
- stages 1-4: max-pool (3, stride 2) + 1x1x1 projection, then blocks of
  `x + gamma * MLP(DecompConv_depthwise(x))` with MLP ratio 4, layer scale 1e-6 and no LayerNorm;
  stage kernels 13, 11, 9, 7.

The original permutes its input to (H, W, D) internally; here everything stays (B, C, D, H, W) and the
conversion of released weights (`med3dvlm.convert`) permutes the kernels instead.

Two training options, neither of which changes the weights or the outputs:

- `config.grad_checkpointing` (or `set_grad_checkpointing()`): each of the stem's four convolutions and each
  block runs under `torch.utils.checkpoint`, so only its input is kept for the backward pass and the rest is
  recomputed there. BatchNorm's running statistics are restored after the recomputation, so a checkpointed
  step updates them exactly as a plain one. Only in training mode with gradients enabled.
- `set_channels_last()`: activations in `channels_last_3d` memory from the stem's first convolution on,
  where oneDNN's depthwise and 1x1x1 kernels (forward and backward) are faster on CPU and the permutes
  around the channel MLP are free views. A runtime choice, not saved with the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..hub import PretrainedModel
from ..registry import register_family, register_model
from .layers import DecompConv3d, Mlp, to_tokens


@dataclass
class DCFormerConfig(ModelConfig):
    model_type = "dcformer"

    in_channels: int = 1
    stem_channels: int = 64
    dims: tuple[int, ...] = (96, 192, 384, 768)  # channels of stages 1-4
    depths: tuple[int, ...] = (2, 3, 6, 2)  # blocks per stage
    kernel_sizes: tuple[int, ...] = (13, 11, 9, 7)  # decomposed depthwise kernel per stage
    stem_kernel_size: int = 7
    stem_stride: int = 4
    # The paper's strided stem reads 10 of every 64 voxels (`layers.branch_inputs`); True averages each stride
    # window instead, so small structures are seen. Same weights; off in the released models.
    stem_antialias: bool = False
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-6
    input_size: tuple[int, int, int] = (128, 256, 256)  # (D, H, W) the model is meant for; not a constraint
    grad_checkpointing: bool = False  # training: recompute block activations in backward (less memory, more time)

    def __post_init__(self) -> None:
        if not (len(self.dims) == len(self.depths) == len(self.kernel_sizes)):
            raise ValueError(
                f"dims, depths and kernel_sizes need one entry per stage, got {self.dims}, {self.depths}, {self.kernel_sizes}"
            )


class DecomposedStem(nn.Sequential):
    def __init__(self, in_channels: int, channels: int, kernel_size: int, stride: int, antialias: bool = False) -> None:
        super().__init__(
            DecompConv3d(in_channels, channels, kernel_size, stride=stride, antialias=antialias),
            DecompConv3d(channels, channels, 3),
            DecompConv3d(channels, channels, 3),
            DecompConv3d(channels, channels, 3),
        )


class Downsample(nn.Module):
    """Halve the grid with max pooling, then change the width with a bias-free 1x1x1 convolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.proj = nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=False)
        self.channels_last = False  # set by `DCFormer.set_channels_last`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        if self.channels_last and x.is_contiguous(memory_format=torch.channels_last_3d):
            # The 1x1x1 convolution as a matrix product over channels, on the free (B, D, H, W, C) view: PyTorch
            # would send this kernel shape, at batch < 16 on one thread, to its slow reference convolution.
            w = self.proj.weight.flatten(1)
            return torch.nn.functional.linear(x.permute(0, 2, 3, 4, 1), w).permute(0, 4, 1, 2, 3)
        return self.proj(x)


class ConvBlock(nn.Module):
    """Decomposed depthwise convolution, then a channel MLP, scaled and added to the input."""

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: float, layer_scale_init: float) -> None:
        super().__init__()
        self.mixer = DecompConv3d(dim, dim, kernel_size, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, D, H, W, C) so the Linear layers act on channels. Made contiguous so that matmul folds it into one
        # matrix product (otherwise it may batch over an expanded weight, several times slower); in
        # channels_last memory this is free.
        y = self.mixer(x).permute(0, 2, 3, 4, 1).contiguous()
        y = self.mlp(y) * self.gamma
        return x + y.permute(0, 4, 1, 2, 3)  # back to (B, C, D, H, W)


class Stage(nn.Module):
    def __init__(self, in_channels: int, dim: int, depth: int, kernel_size: int, mlp_ratio: float, layer_scale_init: float):
        super().__init__()
        self.downsample = Downsample(in_channels, dim)
        self.blocks = nn.Sequential(*(ConvBlock(dim, kernel_size, mlp_ratio, layer_scale_init) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


@register_family(DCFormerConfig)
class DCFormer(PretrainedModel):
    """DCFormer encoder. `forward` returns the tokens of the stem and of every stage."""

    def __init__(self, config: DCFormerConfig) -> None:
        super().__init__(config)
        self.stem = DecomposedStem(
            config.in_channels, config.stem_channels, config.stem_kernel_size, config.stem_stride, config.stem_antialias
        )
        widths = (config.stem_channels, *config.dims)
        self.stages = nn.ModuleList(
            Stage(widths[i], dim, config.depths[i], config.kernel_sizes[i], config.mlp_ratio, config.layer_scale_init)
            for i, dim in enumerate(config.dims)
        )
        self.channels_last = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing on or off; kept in the config, so it is saved with the model."""
        self.config.grad_checkpointing = bool(enable)

    def set_channels_last(self, enable: bool = True) -> None:
        """Keep activations in channels_last_3d memory (faster on CPU); not saved with the model."""
        self.channels_last = bool(enable)
        for m in self.modules():
            if isinstance(m, (DecompConv3d, Downsample)):
                m.channels_last = bool(enable)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpointed(module, x)
        return module(x)

    @property
    def output_dims(self) -> list[int]:
        """Channels of each output, stem first."""
        return [self.config.stem_channels, *self.config.dims]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (B, C, D, H, W) of the stem and of each stage, in order."""
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (B, {self.config.in_channels}, D, H, W), got {tuple(x.shape)}")
        for i, conv in enumerate(self.stem):
            x = self._run(conv, x)
            if i == 0 and self.channels_last:
                # Only from here: the first convolution has a single input channel, whose kernel gets
                # degenerate strides in channels_last, on which oneDNN fails for batches > 1.
                x = x.contiguous(memory_format=torch.channels_last_3d)
        features = [x]
        for stage in self.stages:
            x = stage.downsample(x)
            for block in stage.blocks:
                x = self._run(block, x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Tokens (B, N, C) of the stem and of each stage, depth-major (D slowest, W fastest)."""
        return [to_tokens(f) for f in self.forward_features(x)]


def checkpointed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` under `torch.utils.checkpoint` (non-reentrant): its activations are recomputed in backward.

    The recomputation runs the module's BatchNorms in training mode a second time, which would move their
    running statistics twice; they are saved before it and put back after it.
    """
    calls = [0]

    def run(inp: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return module(inp)
        with _running_stats_kept(module):
            return module(inp)

    return checkpoint(run, x, use_reentrant=False)


@contextmanager
def _running_stats_kept(module: nn.Module):
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:  # also when the recomputation is stopped early, once it has what backward needs
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _dcformer(stem: int, dims: tuple[int, ...], depths: tuple[int, ...], **kw) -> DCFormerConfig:
    return DCFormerConfig(stem_channels=stem, dims=dims, depths=depths, **kw)


@register_model
def dcformer_test() -> DCFormerConfig:
    """A toy width for fast tests: same code path, small kernels, 64^3 inputs."""
    return _dcformer(8, (8, 16, 16, 32), (1, 1, 1, 1), kernel_sizes=(5, 5, 3, 3), input_size=(64, 64, 64))


@register_model
def dcformer_nano() -> DCFormerConfig:
    return _dcformer(32, (32, 64, 128, 256), (1, 1, 1, 1))


@register_model
def dcformer_naive() -> DCFormerConfig:
    return _dcformer(32, (64, 128, 256, 512), (2, 2, 2, 2))


@register_model
def dcformer_tiny() -> DCFormerConfig:
    return _dcformer(64, (96, 192, 384, 768), (2, 3, 3, 2))


@register_model
def dcformer_small() -> DCFormerConfig:
    """The Med3DVLM encoder: 18,244,800 parameters."""
    return _dcformer(64, (96, 192, 384, 768), (2, 3, 6, 2))


@register_model
def dcformer_base() -> DCFormerConfig:
    return _dcformer(64, (128, 256, 512, 1024), (2, 6, 6, 2))


@register_model
def dcformer_large() -> DCFormerConfig:
    return _dcformer(64, (256, 512, 1024, 2048), (2, 6, 12, 2))
