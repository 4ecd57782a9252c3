"""Multi-modal projectors: encoder tokens in, LLM-width tokens out (Med3DVLM Table 9).

- `mlp2x`     (2xMLP): Linear -> GELU -> Linear on the last-stage (high) tokens only, 32 tokens out.
- `mlp2x_h`   (2xMLP-H): each stream lifted to the LLM width by its own Linear, tokens concatenated
               (low first), then a shared GELU -> Linear; 256 + 32 = 288 tokens out.
- `mixer1x_h` (1xMLP-Mixer-H): one MLP-Mixer layer per stream, 128 + 128 tokens out.
- `mixer2x_h` (2xMLP-Mixer-H, the paper's final choice): two Mixer layers per stream,
               low 256x384 -> 192x(H/2) -> 128xH, high 32x768 -> 64x(H/2) -> 128xH, low tokens first.

A Mixer layer here is exactly the original's: LayerNorm over channels, a token MLP (N -> N' -> N'),
a second LayerNorm over the *input* channels, then a channel MLP (C -> C' -> C'); no residuals (the
token and channel counts change, so none would fit).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..hub import PretrainedModel
from ..registry import register_family, register_model

PROJECTOR_KINDS = ("mlp", "mlp_h", "mixer")


@dataclass
class ProjectorConfig(ModelConfig):
    model_type = "projector"

    kind: str = "mixer"  # one of PROJECTOR_KINDS
    llm_dim: int = 3584  # hidden size of the language model (Qwen2.5-7B)
    low_dim: int = 384  # channels of the penultimate encoder stage
    high_dim: int = 768  # channels of the last encoder stage
    low_tokens: int = 256  # tokens of the penultimate stage (4x8x8 for 128x256x256)
    high_tokens: int = 32  # tokens of the last stage (2x4x4)
    low_tokens_out: tuple[int, ...] = (192, 128)  # mixer: tokens after each layer, low stream
    high_tokens_out: tuple[int, ...] = (64, 128)  # mixer: tokens after each layer, high stream
    mlp_depth: int = 2  # Linear layers per MLP (2 = the paper's extra hidden projection)

    def __post_init__(self) -> None:
        if self.kind not in PROJECTOR_KINDS:
            raise ValueError(f"unknown projector kind {self.kind!r}; choose from {PROJECTOR_KINDS}")
        if self.mlp_depth < 1:
            raise ValueError("mlp_depth must be at least 1")
        if self.kind == "mixer":
            depth = len(self.low_tokens_out)
            if depth != len(self.high_tokens_out) or depth == 0:
                raise ValueError("low_tokens_out and high_tokens_out need the same, non-zero number of layers")
            if self.llm_dim % 2**depth:
                raise ValueError(f"llm_dim {self.llm_dim} must be divisible by 2**depth = {2**depth}")

    @property
    def num_output_tokens(self) -> int:
        if self.kind == "mlp":
            return self.high_tokens
        if self.kind == "mlp_h":
            return self.low_tokens + self.high_tokens
        return self.low_tokens_out[-1] + self.high_tokens_out[-1]


class ProjMlp(nn.Sequential):
    """Linear(in, out), then (GELU, Linear(out, out)) for each further layer."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(fc1=nn.Linear(in_dim, out_dim))
        for i in range(2, depth + 1):
            layers[f"act{i - 1}"] = nn.GELU()
            layers[f"fc{i}"] = nn.Linear(out_dim, out_dim)
        super().__init__(layers)


class MixerLayer(nn.Module):
    """(B, N, C) -> (B, N', C'): token MLP over N, then channel MLP over C."""

    def __init__(self, tokens: int, channels: int, tokens_out: int, channels_out: int, mlp_depth: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.token_mlp = ProjMlp(tokens, tokens_out, mlp_depth)
        self.norm2 = nn.LayerNorm(channels)
        self.channel_mlp = ProjMlp(channels, channels_out, mlp_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mlp(self.norm1(x).transpose(1, 2))  # (B, C, N')
        return self.channel_mlp(self.norm2(x.transpose(1, 2)))  # (B, N', C')


def _mixer_stream(tokens: int, channels: int, tokens_out: tuple[int, ...], llm_dim: int, mlp_depth: int) -> nn.ModuleList:
    # Layer i widens to llm_dim / 2**(depth - i - 1): the last layer lands exactly on llm_dim.
    depth = len(tokens_out)
    layers = []
    for i, n_out in enumerate(tokens_out):
        c_out = llm_dim // 2 ** (depth - i - 1)
        layers.append(MixerLayer(tokens, channels, n_out, c_out, mlp_depth))
        tokens, channels = n_out, c_out
    return nn.ModuleList(layers)


@register_family(ProjectorConfig)
class Projector(PretrainedModel):
    """Maps the encoder's [low, high] token lists to (B, num_output_tokens, llm_dim)."""

    config_class = ProjectorConfig

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__(config)
        c = config
        if c.kind == "mlp":
            self.mlp = ProjMlp(c.high_dim, c.llm_dim, c.mlp_depth)
        elif c.kind == "mlp_h":
            self.low_proj = nn.Linear(c.low_dim, c.llm_dim)
            self.high_proj = nn.Linear(c.high_dim, c.llm_dim)
            self.act = nn.GELU()
            self.out_proj = nn.Linear(c.llm_dim, c.llm_dim)
        else:
            self.low = _mixer_stream(c.low_tokens, c.low_dim, c.low_tokens_out, c.llm_dim, c.mlp_depth)
            self.high = _mixer_stream(c.high_tokens, c.high_dim, c.high_tokens_out, c.llm_dim, c.mlp_depth)

    @property
    def num_output_tokens(self) -> int:
        return self.config.num_output_tokens

    def example_input(self, batch_size: int = 1, device: str | torch.device = "meta") -> list[torch.Tensor]:
        c = self.config
        return [
            torch.empty(batch_size, c.low_tokens, c.low_dim, device=device),
            torch.empty(batch_size, c.high_tokens, c.high_dim, device=device),
        ]

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`features`: encoder outputs; the last two are taken as (low, high) tokens (B, N, C)."""
        if len(features) < 2:
            raise ValueError(f"a projector needs the last two encoder outputs (low, high), got {len(features)}")
        low, high = features[-2], features[-1]
        c = self.config
        if c.kind == "mlp":
            return self.mlp(high)
        if c.kind == "mlp_h":
            x = torch.cat([self.low_proj(low), self.high_proj(high)], dim=1)
            return self.out_proj(self.act(x))
        for low_layer, high_layer in zip(self.low, self.high):
            low, high = low_layer(low), high_layer(high)
        return torch.cat([low, high], dim=1)


@register_model
def mlp2x() -> ProjectorConfig:
    return ProjectorConfig(kind="mlp")


@register_model
def mlp2x_h() -> ProjectorConfig:
    return ProjectorConfig(kind="mlp_h")


@register_model
def mixer1x_h() -> ProjectorConfig:
    return ProjectorConfig(kind="mixer", low_tokens_out=(128,), high_tokens_out=(128,))


@register_model
def mixer2x_h() -> ProjectorConfig:
    """The paper's dual-stream 2xMLP-Mixer-H: 47,221,248 parameters at llm_dim 3584."""
    return ProjectorConfig(kind="mixer")


@register_model
def mixer2x_h_test() -> ProjectorConfig:
    """Tiny mixer for tests, sized for dcformer_test's last two stages at 64^3 (8x16 and 1x32 tokens)."""
    return ProjectorConfig(
        kind="mixer", llm_dim=64, low_dim=16, high_dim=32, low_tokens=8, high_tokens=1,
        low_tokens_out=(6, 4), high_tokens_out=(2, 4),
    )
