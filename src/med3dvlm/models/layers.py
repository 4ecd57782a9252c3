"""Shared 3D building blocks. Every module takes and returns (B, C, D, H, W) tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def branch_inputs(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of a decomposed convolution's D, H and W branches: `x` itself, or with `stride` > 1 the mean
    of each stride window across the two axes the branch's 1D kernel does not run along.

    A strided 1D kernel reads only the voxels on its own axis through each output position: a stride-4 stem
    sees 10 of every 64 voxels (three lines through each 4x4x4 block), and a lesion of a few voxels can fall
    between them. Averaging across the other axes first lets every voxel count, at the same cost per output.
    """
    if stride == 1:
        return x, x, x
    s = stride
    pool = lambda k: F.avg_pool3d(x, k, k, ceil_mode=True)  # noqa: E731 - partial edge windows average what they hold
    return pool((1, s, s)), pool((s, 1, s)), pool((s, s, 1))


class DecompConv3d(nn.Module):
    """A k x k x k convolution decomposed into three 1D convolutions along D, H and W.

    The three branches run in parallel on the same input, each with its own BatchNorm, and are summed
    (DCFormer, Ates et al. 2025). With `groups=channels` this is the decomposed depthwise token mixer.
    Every branch uses the same stride on all three axes, so the branch outputs have equal shapes; with
    `antialias` a strided branch averages each stride window across its other two axes instead of skipping
    them (`branch_inputs`), an option off in the paper's model.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, antialias: bool = False
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep the grid centred, got {kernel_size}")
        pad = kernel_size // 2
        k = kernel_size
        # With antialias each branch strides only along its own axis and sees the mean of each stride window
        # across the other two (`branch_inputs`); the weights are the same shape either way.
        self.antialias = antialias and stride > 1
        s_d, s_h, s_w = ((stride, 1, 1), (1, stride, 1), (1, 1, stride)) if self.antialias else (stride,) * 3
        self.stride = stride
        self.conv_d = nn.Conv3d(in_channels, out_channels, (k, 1, 1), s_d, (pad, 0, 0), groups=groups)
        self.norm_d = nn.BatchNorm3d(out_channels)
        self.conv_h = nn.Conv3d(in_channels, out_channels, (1, k, 1), s_h, (0, pad, 0), groups=groups)
        self.norm_h = nn.BatchNorm3d(out_channels)
        self.conv_w = nn.Conv3d(in_channels, out_channels, (1, 1, k), s_w, (0, 0, pad), groups=groups)
        self.norm_w = nn.BatchNorm3d(out_channels)
        self.channels_last = False  # set by the model's `set_channels_last`; same outputs, another kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_d, x_h, x_w = branch_inputs(x, self.stride if self.antialias else 1)
        d = self._conv_d_channels_last(x_d) if self.channels_last and x_d.is_contiguous(memory_format=torch.channels_last_3d) else self.conv_d(x_d)
        return self.norm_d(d) + self.norm_h(self.conv_h(x_h)) + self.norm_w(self.conv_w(x_w))

    def _conv_d_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """`conv_d(x)` as a 2D convolution over (D, H*W), a free view in channels_last_3d memory.

        PyTorch sends a 3D convolution whose kernel is 1 x 1 in its last two axes, at batch < 16 on one thread, to
        its slow reference kernel instead of oneDNN, and returns it in the default layout; the 2D form always goes
        to oneDNN and stays channels_last. Only for stride 1 (the depthwise mixers and the stem's later convolutions).
        """
        conv = self.conv_d
        if conv.stride != (1, 1, 1):
            return conv(x)
        h, w = x.shape[-2:]
        out = F.conv2d(x.flatten(3), conv.weight.squeeze(-1), conv.bias, 1, (conv.padding[0], 0), 1, conv.groups)
        return out.unflatten(3, (h, w))

    def branches(self) -> list[tuple[nn.Conv3d, nn.BatchNorm3d]]:
        return [(self.conv_d, self.norm_d), (self.conv_h, self.norm_h), (self.conv_w, self.norm_w)]


class Mlp(nn.Module):
    """Linear -> GELU -> Linear over the last (channel) axis."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D*H*W, C), depth-major: D varies slowest and W fastest."""
    return feature_map.flatten(2).transpose(1, 2)
