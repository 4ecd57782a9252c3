"""Convert released Med3DVLM stage-1 weights (DCFormer_SigLIP, class `DEC_CLIP`) into our `Contrastive3D`.

Xin et al., IEEE JBHI 2025 (https://ieeexplore.ieee.org/document/11145341); original code mirthAI/Med3DVLM
`src/model/CLIP.py`. The original model's state dict has:

- `vision_encoder.encoder.s0...s4.*`: a DCFormer, converted by `med3dvlm.convert.dcformer` (kernel
  permutation from its internal (H, W, D) layout, renamed branches and layer scales);
- `language_encoder.*`: a Hugging Face DistilBERT (ClinicalBERT), whose keys are ours under `text.encoder.`;
- `mm_vision_proj.{weight,bias}`, `mm_language_proj.{weight,bias}`: the two Linear projections;
- `t_prime` and `bias` (sigmoid loss): t = exp(t'), the same parametrization as our `logit_scale`, so they copy
  over unchanged; or `logit_scale` (CLIP loss), which the original multiplies the logits by *without* exp, so
  we store its log.

The DistilBERT architecture is read off the weights' shapes, except the number of attention heads, which
shapes cannot tell (ClinicalBERT has 12); pass `text_config` to override everything.

`load_released_siglip` reads the released folder (MagicXin/DCFormer_SigLIP): the `config.json` of
`DEC_CLIPConfig` (`model_type: "dec_clip"`) beside the weights, which is how `med3dvlm.from_pretrained`
recognises it.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..models.clip import Contrastive3D, ContrastiveConfig
from ..registry import get_config
from .dcformer import (
    closest_registered_dcformer,
    convert_dcformer_state_dict,
    dcformer_overrides,
    infer_config,
    load_directory_weights,
    released_preprocess,
)

_VISION = "vision_encoder."
_TEXT = "language_encoder."
_RENAMES = {
    "mm_vision_proj.weight": "vision_proj.weight",
    "mm_vision_proj.bias": "vision_proj.bias",
    "mm_language_proj.weight": "text_proj.weight",
    "mm_language_proj.bias": "text_proj.bias",
    "t_prime": "logit_scale",
    "bias": "logit_bias",
}
# Buffers some transformers versions save and others rebuild (position ids are arange(max_positions)).
_DERIVED_TEXT_BUFFERS = ("embeddings.position_ids",)


def _sub(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def infer_distilbert_config(text_state_dict: dict[str, torch.Tensor], n_heads: int = 12) -> dict[str, Any]:
    """A DistilBERT config dict from its weights (keys without the `language_encoder.` prefix)."""
    try:
        vocab_size, dim = text_state_dict["embeddings.word_embeddings.weight"].shape
        max_positions = text_state_dict["embeddings.position_embeddings.weight"].shape[0]
        hidden_dim = text_state_dict["transformer.layer.0.ffn.lin1.weight"].shape[0]
    except KeyError as err:
        raise ValueError(
            f"the text tower is not a DistilBERT (no {err.args[0]!r}); pass its Hugging Face config as text_config"
        ) from None
    layers = {int(m.group(1)) for k in text_state_dict if (m := re.match(r"transformer\.layer\.(\d+)\.", k))}
    if dim % n_heads:
        raise ValueError(f"width {dim} is not divisible by n_heads={n_heads}")
    return dict(
        model_type="distilbert",
        vocab_size=int(vocab_size),
        dim=int(dim),
        n_layers=len(layers),
        n_heads=n_heads,
        hidden_dim=int(hidden_dim),
        max_position_embeddings=int(max_positions),
    )


def convert_siglip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original `DEC_CLIP` state dict to `Contrastive3D` keys and layout."""
    vision = _sub(state_dict, _VISION)
    if not vision:
        raise ValueError(f"no vision encoder weights (no key starts with {_VISION!r})")
    out = {f"vision.{k}": v for k, v in convert_dcformer_state_dict(vision).items()}
    for key, value in state_dict.items():
        if key.startswith(_VISION):
            continue
        if key.startswith(_TEXT):
            rest = key[len(_TEXT) :]
            if rest not in _DERIVED_TEXT_BUFFERS:
                out[f"text.encoder.{rest}"] = value
        elif key in _RENAMES:
            out[_RENAMES[key]] = value
        elif key == "logit_scale":
            # The original's CLIP path multiplies by this value directly; ours multiplies by exp(value).
            if value.item() <= 0:
                raise ValueError(f"logit_scale {value.item()} is not positive, so it has no log")
            out["logit_scale"] = value.log()
        else:
            raise ValueError(f"unexpected key in an original DCFormer_SigLIP state dict: {key!r}")
    return out


def _vision_name_and_overrides(vision_state_dict: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """The registered DCFormer matching the weights, or dcformer_small with the fields that differ."""
    inferred = infer_config(vision_state_dict)
    name, differing = closest_registered_dcformer(inferred)
    return (name, {}) if not differing else ("dcformer_small", dcformer_overrides("dcformer_small", inferred))


def convert_siglip_checkpoint(
    state_dict: dict[str, torch.Tensor],
    text_config: dict[str, Any] | None = None,
    n_heads: int = 12,
    max_text_length: int = 512,
) -> Contrastive3D:
    """Build a `Contrastive3D` holding the weights of an original `DEC_CLIP` state dict.

    Args:
        state_dict: the original model's state dict (see `med3dvlm.convert.load_state_dict`).
        text_config: the text encoder's Hugging Face config dict; inferred from the DistilBERT weights if None.
        n_heads: attention heads of the inferred DistilBERT (ClinicalBERT: 12).
        max_text_length: tokens kept per report (the original trains with 512).
    """
    vision_name, overrides = _vision_name_and_overrides(_sub(state_dict, _VISION))
    if text_config is None:
        text_config = infer_distilbert_config(_sub(state_dict, _TEXT), n_heads=n_heads)
    if "mm_vision_proj.weight" not in state_dict:
        raise ValueError("no 'mm_vision_proj.weight': not a DCFormer_SigLIP state dict")
    embed_dim = state_dict["mm_vision_proj.weight"].shape[0]
    loss = "siglip" if "t_prime" in state_dict else "clip"
    config = ContrastiveConfig(
        vision=vision_name,
        vision_overrides=overrides,
        text_config=text_config,
        embed_dim=int(embed_dim),
        max_text_length=max_text_length,
        loss=loss,
        preprocess=released_preprocess(get_config(vision_name, **overrides).input_size),
    )
    model = Contrastive3D(config)
    converted = convert_siglip_state_dict(state_dict)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"converted weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if not math.isfinite(model.logit_scale.item()):
        raise ValueError("the converted temperature t' is not finite")
    return model.eval()


def load_released_siglip(
    directory: str | os.PathLike,
    text_config: dict[str, Any] | None = None,
    n_heads: int = 12,
) -> Contrastive3D:
    """Our `Contrastive3D` from a released DCFormer_SigLIP folder (`config.json` + the `DEC_CLIP` weights).

    The original config names the text model by path only, so its DistilBERT is inferred from the weights
    (see `convert_siglip_checkpoint`); the tokenizer, when the folder has one, is read from the same folder
    by the callers that need it (`loading.load_contrastive`).
    """
    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("model_type") != "dec_clip":
        raise ValueError(f"{directory}: model_type {raw.get('model_type')!r} is not a released DCFormer_SigLIP ('dec_clip')")
    if raw.get("vision_encoder", "dcformer") != "dcformer":
        raise ValueError(f"{directory}: vision_encoder {raw.get('vision_encoder')!r} is not supported (only 'dcformer')")
    max_text_length = int(raw.get("max_text_len", raw.get("max_length", 512)))
    return convert_siglip_checkpoint(load_directory_weights(directory), text_config=text_config, n_heads=n_heads,
                                     max_text_length=max_text_length)
