"""Convert the original Med3DVLM projectors (`mm_projector`) into our `Projector`.

Original modules and their parameter names:
- `MultiModalProjector` (2xMLP): `mm_projector.0` (Linear), `mm_projector.1.1` (Linear after GELU);
- `LowHighHybridMLP` (2xMLP-H): `low_up_mlp`, `high_up_mlp`, `mm_projector.1` (Linear after GELU);
- `MixerLowHighHybridMLP` (Mixer-H): `{low,high}_mixer.{i}.{ln1,ln2}` and
  `{low,high}_mixer.{i}.{mlp1,mlp2}.mm_projector.{0,1.1}` (token and channel MLPs).
The layouts are the same as ours, so conversion is renaming plus reading the sizes off the shapes.
"""

from __future__ import annotations

import re

import torch

from ..models.projector import Projector, ProjectorConfig

_MLP_LAYER = {"0": "fc1", "1.1": "fc2"}


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the projector's own keys, dropping a `model.mm_projector.`-style prefix when present."""
    for marker in ("low_mixer.0.ln1.weight", "low_up_mlp.weight", "mm_projector.0.weight"):
        hits = [k for k in state_dict if k == marker or k.endswith("." + marker)]
        if hits:
            prefix = min(hits, key=len)[: -len(marker)]
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    raise ValueError("no original Med3DVLM projector weights found (no mixer, low/high MLP or mm_projector keys)")


def convert_projector_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[ProjectorConfig, dict[str, torch.Tensor]]:
    """Our config and state dict for an original projector state dict (any key prefix)."""
    sd = _strip_prefix(state_dict)
    out: dict[str, torch.Tensor] = {}
    if "low_mixer.0.ln1.weight" in sd:
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"low_mixer\.(\d+)\.", k)))
        mlp_depth = 2 if "low_mixer.0.mlp1.mm_projector.1.1.weight" in sd else 1
        config = ProjectorConfig(
            kind="mixer",
            llm_dim=sd[f"low_mixer.{depth - 1}.mlp2.mm_projector.0.weight"].shape[0],
            low_dim=sd["low_mixer.0.ln1.weight"].shape[0],
            high_dim=sd["high_mixer.0.ln1.weight"].shape[0],
            low_tokens=sd["low_mixer.0.mlp1.mm_projector.0.weight"].shape[1],
            high_tokens=sd["high_mixer.0.mlp1.mm_projector.0.weight"].shape[1],
            low_tokens_out=tuple(sd[f"low_mixer.{i}.mlp1.mm_projector.0.weight"].shape[0] for i in range(depth)),
            high_tokens_out=tuple(sd[f"high_mixer.{i}.mlp1.mm_projector.0.weight"].shape[0] for i in range(depth)),
            mlp_depth=mlp_depth,
        )
        for key, value in sd.items():
            m = re.fullmatch(r"(low|high)_mixer\.(\d+)\.(ln1|ln2|mlp1|mlp2)\.(?:mm_projector\.(0|1\.1)\.)?(weight|bias)", key)
            if not m:
                raise ValueError(f"unexpected key in an original mixer projector: {key!r}")
            stream, layer, part, mlp_layer, leaf = m.groups()
            name = {"ln1": "norm1", "ln2": "norm2", "mlp1": "token_mlp", "mlp2": "channel_mlp"}[part]
            sub = f".{_MLP_LAYER[mlp_layer]}" if mlp_layer else ""
            out[f"{stream}.{layer}.{name}{sub}.{leaf}"] = value
    elif "low_up_mlp.weight" in sd:
        llm_dim, low_dim = sd["low_up_mlp.weight"].shape
        config = ProjectorConfig(kind="mlp_h", llm_dim=llm_dim, low_dim=low_dim, high_dim=sd["high_up_mlp.weight"].shape[1])
        rename = {"low_up_mlp": "low_proj", "high_up_mlp": "high_proj", "mm_projector.1": "out_proj"}
        for key, value in sd.items():
            module, _, leaf = key.rpartition(".")
            if module not in rename:
                raise ValueError(f"unexpected key in an original 2xMLP-H projector: {key!r}")
            out[f"{rename[module]}.{leaf}"] = value
    else:
        llm_dim, high_dim = sd["mm_projector.0.weight"].shape
        config = ProjectorConfig(kind="mlp", llm_dim=llm_dim, high_dim=high_dim,
                                 mlp_depth=2 if "mm_projector.1.1.weight" in sd else 1)
        for key, value in sd.items():
            m = re.fullmatch(r"mm_projector\.(0|1\.1)\.(weight|bias)", key)
            if not m:
                raise ValueError(f"unexpected key in an original 2xMLP projector: {key!r}")
            out[f"mlp.{_MLP_LAYER[m.group(1)]}.{m.group(2)}"] = value
    return config, out


def convert_projector_checkpoint(state_dict: dict[str, torch.Tensor]) -> Projector:
    """Build our `Projector` holding the weights of the original projector in `state_dict`."""
    config, converted = convert_projector_state_dict(state_dict)
    model = Projector(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()
