"""Load a released Med3DVLM checkpoint (e.g. MagicXin/Med3DVLM-Qwen-2.5-7B) without `trust_remote_code`.

The released layout is one Hugging Face directory: a `config.json` with `model_type: "vlm_qwen"` (a Qwen2
config plus the vision/projector settings), weight shards with the merged LLM under `model.*`/`lm_head.*`,
the DCFormer under `model.vision_tower.vision_tower.*` and the projector under `model.mm_projector.*`, and a
Qwen2 tokenizer that already holds `<im_patch>`. We rebuild it as our `Med3DVLM` with `splice="original"`,
which reproduces the original's splice at positions 1..N (and so its logits), dropped first text token included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .dcformer import (
    closest_registered_dcformer,
    convert_dcformer_checkpoint,
    load_directory_weights,
    released_preprocess,
)
from .projector import convert_projector_checkpoint

# Keys of the released config that describe the vision tower and projector, not the Qwen2 LLM.
_VLM_KEYS = {
    "input_size", "patch_size", "dim", "depth", "vision_tower", "vision_select_layer", "vision_select_feature",
    "mm_projector_type", "mm_mlp_depth", "proj_out_num", "low_output_size", "high_output_size", "low_input_size",
    "high_input_size", "mm_hidden_size", "tune_mm_mlp_adapter", "num_new_tokens", "img_token_id", "auto_map",
    "architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
}


def load_released_med3dvlm(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Any:
    """Our `Med3DVLM` holding a released Med3DVLM checkpoint's weights, with the original's splice."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from ..models.vlm import Med3DVLM, VLMConfig

    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("vision_tower") != "dcformer":
        raise ValueError(f"{directory}: vision_tower {raw.get('vision_tower')!r} is not supported (only 'dcformer')")
    if raw.get("mm_projector_type", "mixer") not in ("mixer", "mlp", "low_high_mlp"):
        raise ValueError(f"{directory}: mm_projector_type {raw.get('mm_projector_type')!r} is not supported")
    state = load_directory_weights(directory)

    vision = convert_dcformer_checkpoint(state)
    projector = convert_projector_checkpoint({k: v for k, v in state.items() if k.startswith("model.mm_projector.")})
    llm_state = {k: v for k, v in state.items() if not k.startswith(("model.vision_tower.", "model.mm_projector."))}

    qwen_fields = {k: v for k, v in raw.items() if k not in _VLM_KEYS and k != "model_type"}
    qwen_config = Qwen2Config(**qwen_fields)
    llm = Qwen2ForCausalLM(qwen_config)
    if qwen_config.tie_word_embeddings and "lm_head.weight" not in llm_state:
        llm_state["lm_head.weight"] = llm_state["model.embed_tokens.weight"]
    missing, unexpected = llm.load_state_dict(llm_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: LLM weights do not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    llm = llm.to(dtype)

    h, w, d = raw.get("input_size", (256, 256, 128))  # the original stores (H, W, D)
    vision_name, vision_overrides = closest_registered_dcformer(
        vision.config.replace(input_size=(d, h, w), preprocess=released_preprocess((d, h, w))))
    kind_name = {"mixer": "mixer2x_h", "mlp": "mlp2x", "low_high_mlp": "mlp2x_h"}[raw.get("mm_projector_type", "mixer")]
    p = projector.config
    projector_overrides = {"kind": p.kind, "low_tokens_out": p.low_tokens_out, "high_tokens_out": p.high_tokens_out,
                           "mlp_depth": p.mlp_depth}
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = VLMConfig(
        vision=vision_name,
        vision_overrides=vision_overrides,
        projector=kind_name,
        projector_overrides=projector_overrides,
        llm=str(directory),
        image_token="<im_patch>",
        splice="original",
        max_length=raw.get("model_max_length", 512),
    )
    model = Med3DVLM(config, llm=llm, tokenizer=tokenizer)
    model.vision.load_state_dict(vision.state_dict())
    model.projector.load_state_dict(projector.state_dict())
    return model.eval()
