"""Shared test fixtures. Tests run on CPU, offline, on tiny registered variants."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def assets() -> Path:
    return ASSETS


_CORPUS = [
    "The liver shows a hypodense lesion in the right lobe measuring 2 cm.",
    "No abnormality is seen in the kidneys, spleen or pancreas.",
    "Axial contrast enhanced CT in the portal venous phase.",
    "What organ is abnormal? Which plane is this image? Choices: A. axial B. coronal C. sagittal D. none",
    "Describe the findings of the medical image you see.",
    "There is a cyst in the left kidney. The spleen is normal. yes no",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory (no download), without a BOS token like Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
