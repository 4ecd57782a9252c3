"""Converted original DCFormer weights reproduce the original model's outputs.

Two references: the outputs the original Med3DVLM code computed (tests/assets, see its README), and an
implementation of the original's forward written here in its own layout ((H, W, D) internally) and with
its own parameter names, so that every renaming and kernel permutation of the converter is exercised.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import med3dvlm
from med3dvlm.cli import main
from med3dvlm.convert import convert_dcformer_checkpoint, load_state_dict
from med3dvlm.convert.dcformer import released_preprocess
from med3dvlm.data.preprocess import PreprocessSpec

from .original_reference import OrigModel, randomize_batchnorm


TINY = dict(stem=8, dims=(8, 16, 16, 32), depths=(1, 2, 1, 1), kernels=(5, 5, 3, 3))


def test_reproduces_outputs_of_the_original_code(assets):
    state = load_state_dict(assets / "original-dcformer-nano" / "original_state_dict.safetensors")
    ref = load_file(assets / "original-dcformer-nano" / "input_and_outputs.safetensors")
    model = convert_dcformer_checkpoint(state)
    assert model.num_parameters() == 789_216
    with torch.no_grad():
        outputs = model(ref["input"])
    for i, out in enumerate(outputs):
        assert out.shape == ref[f"stage{i}"].shape
        assert (out - ref[f"stage{i}"]).abs().max() < 1e-4


@pytest.mark.parametrize(
    "scale_name,duplicate_norms,prefix,suffix",
    [
        ("scale", False, "vision_encoder.", ".safetensors"),  # a DCFormer_SigLIP checkpoint
        ("scale", False, "model.vision_tower.vision_tower.", ".bin"),  # inside a Med3DVLM model
        ("gamma", True, "", ".pt"),  # a bare mirthAI/DCFormer encoder
    ],
)
def test_original_layout_and_names_convert_through_the_cli(tmp_path, scale_name, duplicate_norms, prefix, suffix):
    original = randomize_batchnorm(OrigModel(**TINY, scale_name=scale_name, duplicate_norms=duplicate_norms))
    state = {prefix + k: v for k, v in original.state_dict().items()}
    state[prefix.split(".")[0] + ".unrelated.weight" if prefix else "text.weight"] = torch.zeros(3)
    path = tmp_path / f"original{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)

    assert main(["convert", str(path), "--out", str(tmp_path / "ours")]) == 0
    ours = med3dvlm.from_pretrained(tmp_path / "ours")
    assert list(ours.config.dims) == list(TINY["dims"]) and list(ours.config.depths) == list(TINY["depths"])

    x = torch.randn(2, 1, 48, 64, 80)  # non-cubic, so a wrong axis mapping cannot pass
    with torch.no_grad():
        expected, got = original(x), ours(x)
    assert len(got) == len(expected) == 5
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert (e - g).abs().max() < 1e-4


def test_converted_small_is_the_registered_variant():
    original = OrigModel(stem=64, dims=(96, 192, 384, 768), depths=(2, 3, 6, 2), kernels=(13, 11, 9, 7))
    model = convert_dcformer_checkpoint(original.state_dict())
    registered = med3dvlm.get_config("dcformer_small")
    # The same architecture, plus the released models' preprocessing: M3D's min-max after a soft-tissue window for HU.
    assert model.config == registered.replace(preprocess=released_preprocess(registered.input_size))
    assert PreprocessSpec.for_model(model.config) == PreprocessSpec.m3d(registered.input_size, hu_window="soft_tissue")
    assert model.num_parameters() == 18_244_800


def test_pickles_are_read_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"encoder.s0.0.0.c1.0.weight": Evil()}, f)
    with pytest.raises(ValueError, match="weights-only"):
        load_state_dict(path)


def test_no_dcformer_in_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no original DCFormer"):
        convert_dcformer_checkpoint({"foo.weight": torch.zeros(2)})
