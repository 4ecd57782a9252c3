"""Parameter counts, token shapes and compute of the encoders, exact to the paper and the original code."""

import pytest
import torch

import med3dvlm
from med3dvlm.models.layers import to_tokens
from med3dvlm.profiling import profile_model

PARAMS = {
    "dcformer_nano": 789_216,
    "dcformer_naive": 5_851_680,
    "dcformer_tiny": 14_657_472,
    "dcformer_small": 18_244_800,
    "dcformer_base": 33_868_864,
    "dcformer_large": 185_125_440,
    "vit3d_base": 87_389_184,
}


@pytest.mark.parametrize("name,expected", PARAMS.items())
def test_parameter_counts(name, expected):
    with torch.device("meta"):
        model = med3dvlm.create_model(name)
    assert model.num_parameters() == expected


def test_dcformer_small_token_shapes_and_gmac():
    summary = profile_model("dcformer_small", (128, 256, 256))
    assert summary.params == 18_244_800
    assert summary.outputs == [[131072, 64], [16384, 96], [2048, 192], [256, 384], [32, 768]]
    assert summary.gmac == pytest.approx(21.36, abs=0.01)


def test_vit3d_base_tokens_and_gmac():
    summary = profile_model("vit3d_base", (32, 256, 256))
    assert summary.outputs == [[2049, 768]]  # cls + 8x16x16 patches
    assert summary.gmac == pytest.approx(253.0, abs=1.0)


def test_tokens_are_depth_major():
    fmap = torch.arange(2 * 3 * 4).float().reshape(1, 1, 2, 3, 4)  # (B, C, D, H, W)
    tokens = to_tokens(fmap)
    assert tokens.shape == (1, 24, 1)
    # token n = (d * H + h) * W + w: D slowest, W fastest
    assert tokens[0, :, 0].tolist() == list(range(24))
    fmap2 = torch.randn(1, 3, 2, 3, 4)
    t2 = to_tokens(fmap2)
    assert torch.equal(t2[0, (1 * 3 + 2) * 4 + 3], fmap2[0, :, 1, 2, 3])


@pytest.mark.parametrize("name,size", [("dcformer_test", (64, 64, 64)), ("vit3d_test", (16, 32, 32))])
def test_forward_backward_reaches_every_parameter(name, size):
    model = med3dvlm.create_model(name).train()
    outputs = model(torch.randn(2, 1, *size))
    assert all(o.shape[0] == 2 and o.dim() == 3 for o in outputs)
    assert [o.shape[-1] for o in outputs] == model.output_dims
    sum(o.square().mean() for o in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_dcformer_keeps_the_grid_layout():
    model = med3dvlm.create_model("dcformer_test").eval()
    maps = model.forward_features(torch.randn(1, 1, 64, 32, 96))
    # stride 4 stem then a halving per stage, independently on D, H and W
    assert [tuple(m.shape[2:]) for m in maps] == [(16, 8, 24), (8, 4, 12), (4, 2, 6), (2, 1, 3), (1, 1, 2)]


def test_bad_input_shape_is_a_clear_error():
    model = med3dvlm.create_model("dcformer_test")
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 64, 64, 64))
    vit = med3dvlm.create_model("vit3d_test")
    with pytest.raises(ValueError, match="position embedding"):
        vit(torch.randn(1, 1, 16, 32, 48))
