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


def _voxels_reaching_the_output(model: torch.nn.Module, size: tuple[int, int, int]) -> float:
    x = torch.randn(1, 1, *size, requires_grad=True)
    sum(t.sum() for t in model(x)).backward()
    return (x.grad[0, 0] != 0).float().mean().item()


def test_paper_stem_reads_10_of_64_voxels_and_the_antialiased_one_all():
    # The strided 1D kernels of the paper's stem only read the lines through each 4x4x4 block's corner: a
    # lesion between them never reaches the model. The antialiased stem averages each stride window instead.
    torch.manual_seed(0)
    paper = med3dvlm.create_model("dcformer_test").eval()
    assert _voxels_reaching_the_output(paper, (32, 32, 32)) == pytest.approx(10 / 64)
    antialiased = med3dvlm.create_model("dcformer_test", stem_antialias=True).eval()
    assert _voxels_reaching_the_output(antialiased, (32, 32, 32)) == 1.0
    # Same parameters (released weights load into either), same token shapes, on sizes the stride does not divide.
    assert {k: v.shape for k, v in paper.state_dict().items()} == {k: v.shape for k, v in antialiased.state_dict().items()}
    x = torch.randn(2, 1, 30, 34, 37)
    assert [t.shape for t in paper(x)] == [t.shape for t in antialiased(x)]


def test_antialiased_stem_is_a_box_filter_before_the_1d_kernel():
    from med3dvlm.models.layers import DecompConv3d

    torch.manual_seed(0)
    conv = DecompConv3d(1, 3, 5, stride=4, antialias=True).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    # Each branch by hand: the mean over the 4x4 window across the other two axes, then the strided 1D kernel.
    pooled_d = x.unflatten(3, (4, 4)).unflatten(5, (4, 4)).mean((4, 6))  # (1, 1, 16, 4, 4)
    expected_d = conv.norm_d(torch.nn.functional.conv3d(pooled_d, conv.conv_d.weight, conv.conv_d.bias, (4, 1, 1), (2, 0, 0)))
    plain_h = conv.norm_h(conv.conv_h(torch.nn.functional.avg_pool3d(x, (4, 1, 4))))
    plain_w = conv.norm_w(conv.conv_w(torch.nn.functional.avg_pool3d(x, (4, 4, 1))))
    torch.testing.assert_close(conv(x), expected_d + plain_h + plain_w)


def test_fast_path_matches_with_the_antialiased_stem():
    from med3dvlm.models.fast import optimize_for_inference

    torch.manual_seed(0)
    model = med3dvlm.create_model("dcformer_test", stem_antialias=True).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), optimize_for_inference(model)(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
