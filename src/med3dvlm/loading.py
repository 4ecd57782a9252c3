"""Loading saved models: our format or a released layout, and the one device policy for inference.

`from_pretrained` (exported as `med3dvlm.from_pretrained`) takes a local folder or a Hugging Face repo
id (resolved to a cached snapshot by `hub.resolve_model_dir`), looks at `model_type` in `config.json`
and hands a released checkpoint (Med3DVLM-Qwen-2.5-7B, DCFormer_SigLIP) to `med3dvlm.convert`,
anything else to `med3dvlm.hub`. It sits above both, so the hub (which every model imports) never
imports the converters.

The rest is what every inference entry point (prediction, search, evaluation) needs: pick the device
once (`resolve_device`: CUDA when there is one, else the CPU), check that the folder holds the kind
of model the caller can use, and move it there in eval mode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import hub

logger = logging.getLogger(__name__)

# What the callers need of a model, by the attributes they call; the phrase names it in errors.
CONTRASTIVE = (("encode_image", "encode_text"), "a contrastive image-text model")
CONTRASTIVE_IMAGE = (("encode_image",), "a contrastive image-text model")


def from_pretrained(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    **overrides: Any,
) -> nn.Module:
    """Load whatever model a folder or a hub repo holds: our format (see `med3dvlm.hub`) or a released one.

    Args:
        name_or_path: a local folder, or a Hugging Face repo id such as "MagicXin/Med3DVLM-Qwen-2.5-7B".
        revision: a branch, tag or commit of the repo (default: main).
        cache_dir: the hub cache to use (default: HF_HUB_CACHE).
        local_files_only: never download; use the cache only (as HF_HUB_OFFLINE=1 does).
        token: for private or gated repos (default: the logged-in token).
        overrides: config fields to change (our format), or `dtype` (released Med3DVLM).

    Raises:
        FileNotFoundError: no such folder or repo, or the repo is not cached while downloads are off.
    """
    directory = hub.resolve_model_dir(name_or_path, revision, cache_dir, local_files_only, token)
    model_type = hub.peek_model_type(directory)
    if model_type == "vlm_qwen":  # the released Med3DVLM layout, not our format
        from .convert.med3dvlm import load_released_med3dvlm

        return load_released_med3dvlm(directory, **overrides)
    if model_type == "dec_clip":  # the released stage-1 DCFormer-SigLIP
        from .convert.siglip import load_released_siglip

        return load_released_siglip(directory, **overrides)
    return hub.from_pretrained(directory, **overrides)


def resolve_device(device: str | torch.device | None = None) -> str | torch.device:
    """`device` as given, or CUDA when available, else the CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(
    model_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    requires: Sequence[str] = (),
    kind: str = "a model",
) -> nn.Module:
    """The model saved in `model_dir`, on `device` (see `resolve_device`), in eval mode.

    Args:
        requires: attributes the caller will use; a model lacking one (or with it set to None, like a VLM
            saved without its tokenizer) is refused.
        kind: how the error names the model the caller needs, e.g. "a contrastive image-text model".

    Raises:
        TypeError: the folder holds another kind of model.
    """
    model = from_pretrained(model_dir)  # a hub id is resolved here; callers needing files resolve it first
    if any(getattr(model, name, None) is None for name in requires):
        raise TypeError(f"{model_dir}: holds a {type(model).__name__}, not {kind}")
    return model.to(resolve_device(device)).eval()


def load_contrastive(
    model_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    require_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """A saved contrastive model (see `load_for_inference`) and the tokenizer saved with it.

    Without `require_tokenizer`, a missing tokenizer is logged and returned as None: image-only use still works.
    """
    from .models.text import load_tokenizer

    requires, kind = CONTRASTIVE if require_tokenizer else CONTRASTIVE_IMAGE
    model_dir = hub.resolve_model_dir(model_dir)  # the tokenizer is read from the same snapshot
    model = load_for_inference(model_dir, device, requires=requires, kind=kind)
    try:
        return model, load_tokenizer(model_dir)
    except (OSError, ValueError) as err:
        if require_tokenizer:
            raise FileNotFoundError(f"{model_dir}: no tokenizer saved with the model ({err})") from None
        logger.warning("%s: no tokenizer saved with the model (%s); text embeddings are unavailable", model_dir, err)
        return model, None
