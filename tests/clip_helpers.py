"""Helpers shared by the stage-1, retrieval and search tests: a tiny phantom dataset and a tiny saved model."""

from __future__ import annotations

from pathlib import Path

TINY_SIZE = (16, 32, 32)


def tiny_phantom(root: Path, n: int = 12) -> Path:
    """A phantom M3D dataset of `n` cases at 16x32x32; returns its M3D_Cap.json."""
    from med3dvlm.data.phantom import write_phantom_dataset

    write_phantom_dataset(root, n=n, seed=3, size=TINY_SIZE, fractions=(0.5, 0.1, 0.4), progress=False)
    return root / "M3D_Cap.json"


def tiny_model_dir(root: Path) -> Path:
    """clip_dcformer_test (random weights) saved with MiniLM's tokenizer, at the tiny input size."""
    from med3dvlm.models.text import load_tokenizer, minilm_dir
    from med3dvlm.registry import create_model

    model = create_model("clip_dcformer_test", vision_overrides={"input_size": list(TINY_SIZE)})
    model.save_pretrained(root, tokenizer=load_tokenizer(minilm_dir()))
    return root
