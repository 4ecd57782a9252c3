"""Convert original DCFormer weights (mirthAI/Med3DVLM and mirthAI/DCFormer) into our `DCFormer`.

The original differs from ours in three ways that matter for its weights:

- it permutes the input (B, 1, D, H, W) to (B, 1, H, W, D) and runs there, so its branch `c1` (kernel k x 1 x 1)
  runs along H, `c2` along W and `c3` along D, and every kernel is stored in (H, W, D) order. We keep
  (D, H, W) and permute the kernels once here instead;
- Med3DVLM names the layer scale `scale`, DCFormer names it `gamma`;
- DCFormer registers each branch BatchNorm twice (also under `norm.{0,1,2}`), so its state dict has the
  same tensors under two names.

The state dict may sit inside a larger checkpoint (the vision tower of a DCFormer_SigLIP or a Med3DVLM
model): the DCFormer part is found by its `encoder.s0.` keys, whatever prefix precedes them.

Every released model was trained on M3D-Cap, 8-bit slices that Radiopaedia had windowed for display, so
the converted configs store the M3D min-max spec with `RELEASED_HU_WINDOW` (`released_preprocess`): a raw
HU scan is windowed before the min-max instead of being min-maxed over -1024..3000 HU. The original
display windows are not recorded anywhere; docs/design.md says why soft tissue is the default.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..data.preprocess import PreprocessSpec
from ..models.dcformer import DCFormer, DCFormerConfig
from ..registry import get_config, list_models

# Original branch index -> (our axis, permutation of a (O, I, kH, kW, kD) kernel into (O, I, kD, kH, kW)).
_BRANCH_AXIS = {"1": "h", "2": "w", "3": "d"}
_KERNEL_PERMUTE = (0, 1, 4, 2, 3)
_STEM_KEY = "encoder.s0.0.0.c1.0.weight"
# The display window assumed for M3D-Cap's Radiopaedia images (see the module docstring): W400/L40.
RELEASED_HU_WINDOW = "soft_tissue"


def released_preprocess(size: tuple[int, int, int]) -> dict[str, Any]:
    """The preprocessing spec stored with a converted released model of input `size` (D, H, W)."""
    return PreprocessSpec.m3d(tuple(size), hu_window=RELEASED_HU_WINDOW).to_dict()  # type: ignore[arg-type]


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from a .bin/.pt/.pth pickle with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot be read as a weights-only PyTorch checkpoint ({err})") from None
    # Training checkpoints often wrap the weights.
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: does not hold a state dict of tensors")
    return obj


def load_directory_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole state dict of a Hugging Face model folder: sharded (`model.safetensors.index.json`),
    one `model.safetensors`, or a pickled `pytorch_model.bin` (read with weights_only=True)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_state_dict(directory / shard))
        return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return load_state_dict(directory / name)
    raise FileNotFoundError(f"{directory}: no model.safetensors(.index.json) or pytorch_model.bin")


def find_dcformer_prefix(state_dict: dict[str, torch.Tensor]) -> str:
    """The key prefix in front of the original DCFormer's `encoder.s0...` keys ("" for a bare encoder)."""
    prefixes = sorted({k[: -len(_STEM_KEY)] for k in state_dict if k.endswith(_STEM_KEY)})
    if not prefixes:
        raise ValueError(f"no original DCFormer weights found (no key ends with {_STEM_KEY!r})")
    if len(prefixes) > 1:
        raise ValueError(f"several DCFormer encoders in one state dict, prefixes {prefixes}; pass `prefix=`")
    return prefixes[0]


def infer_config(state_dict: dict[str, torch.Tensor]) -> DCFormerConfig:
    """Read widths, depths and kernels off an original DCFormer state dict (keys starting at `encoder.`)."""
    stem_w = state_dict["encoder.s0.0.0.c1.0.weight"]  # (C0, in, k, 1, 1) in (H, W, D) order
    dims, depths, kernels = [], [], []
    stage = 1
    while f"encoder.s{stage}.0.proj.weight" in state_dict:
        dims.append(state_dict[f"encoder.s{stage}.0.proj.weight"].shape[0])
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(rf"encoder\.s{stage}\.(\d+)\.", k))}
        depths.append(len(blocks))
        kernels.append(state_dict[f"encoder.s{stage}.0.dwconv.c1.0.weight"].shape[2])
        stage += 1
    if not dims:
        raise ValueError("no DCFormer stages found (no key 'encoder.s1.0.proj.weight')")
    config = DCFormerConfig(
        in_channels=stem_w.shape[1],
        stem_channels=stem_w.shape[0],
        dims=tuple(dims),
        depths=tuple(depths),
        kernel_sizes=tuple(kernels),
        stem_kernel_size=stem_w.shape[2],
    )
    # Prefer the registered variant of the same architecture, so the checkpoint carries its input size too.
    name, differing = closest_registered_dcformer(config, ignore=("input_size", "preprocess"))
    return get_config(name) if not differing else config


def dcformer_overrides(name: str, config: DCFormerConfig, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `config` that differ from the registered DCFormer `name` (lists as tuples), minus `ignore`."""
    registered = get_config(name).to_dict()
    return {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in config.to_dict().items()
        if registered.get(k) != v and k != "model_type" and k not in ignore
    }


def closest_registered_dcformer(config: DCFormerConfig, ignore: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    """The registered DCFormer with the fewest fields differing from `config`, and those fields.

    The converters name the registered variant in the configs they write, so a converted checkpoint
    says which architecture it is; the overrides make it equal to the weights when no variant fits exactly.
    """
    best: tuple[str, dict[str, Any]] | None = None
    for name in list_models("dcformer_*"):
        differing = dcformer_overrides(name, config, ignore)
        if best is None or len(differing) < len(best[1]):
            best = (name, differing)
    if best is None:
        raise LookupError("no DCFormer variant is registered")
    return best


def _rename(key: str) -> str | None:
    """Our name for one original key, or None for keys to drop (the duplicate `norm.i` BatchNorms)."""
    if re.search(r"\.norm\.\d\.", key):
        return None
    if m := re.fullmatch(r"encoder\.s0\.0\.(\d)\.c(\d)\.([01])\.(.+)", key):
        block, branch, part, rest = m.groups()
        kind = "conv" if part == "0" else "norm"
        return f"stem.{block}.{kind}_{_BRANCH_AXIS[branch]}.{rest}"
    if m := re.fullmatch(r"encoder\.s(\d)\.(\d+)\.(.+)", key):
        stage, block, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
        if rest == "proj.weight":
            return f"stages.{stage}.downsample.proj.weight"
        if rest in ("scale", "gamma"):
            return f"stages.{stage}.blocks.{block}.gamma"
        if mm := re.fullmatch(r"dwconv\.c(\d)\.([01])\.(.+)", rest):
            branch, part, leaf = mm.groups()
            kind = "conv" if part == "0" else "norm"
            return f"stages.{stage}.blocks.{block}.mixer.{kind}_{_BRANCH_AXIS[branch]}.{leaf}"
        if mm := re.fullmatch(r"mlp\.mlp\.([03])\.(.+)", rest):
            fc = "fc1" if mm.group(1) == "0" else "fc2"
            return f"stages.{stage}.blocks.{block}.mlp.{fc}.{mm.group(2)}"
    raise ValueError(f"unexpected key in an original DCFormer state dict: {key!r}")


def convert_dcformer_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original DCFormer state dict (keys starting at `encoder.`) to our `DCFormer` keys and layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = _rename(key)
        if new is None:
            twin = re.sub(r"\.norm\.(\d)\.", lambda m: f".c{int(m.group(1)) + 1}.1.", key)
            if twin in state_dict and not torch.equal(state_dict[twin], value):
                raise ValueError(f"{key} and {twin} should be the same BatchNorm but differ")
            continue
        if new.endswith(".weight") and value.dim() == 5 and ".conv_" in new:
            value = value.permute(*_KERNEL_PERMUTE)
        out[new] = value.contiguous()
    return out


def convert_dcformer_checkpoint(
    state_dict: dict[str, torch.Tensor], prefix: str | None = None
) -> DCFormer:
    """Build our `DCFormer` holding the weights of the original encoder found in `state_dict`."""
    prefix = find_dcformer_prefix(state_dict) if prefix is None else prefix
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "encoder.")}
    if not sub:
        raise ValueError(f"no keys start with {prefix + 'encoder.'!r}")
    config = infer_config(sub)
    config = config.replace(preprocess=released_preprocess(config.input_size))
    model = DCFormer(config)
    converted = convert_dcformer_state_dict(sub)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"converted weights do not fit {config}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
