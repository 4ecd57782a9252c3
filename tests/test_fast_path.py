"""The fast inference path gives the same outputs as the plain model."""

import pytest
import torch

import med3dvlm
from med3dvlm.models.fast import FusedDecompConv3d, fold_batchnorm, optimize_for_inference


def _randomize(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.data.uniform_(0.5, 1.0)  # make the blocks matter, not just the 1e-6 init
    return model.eval()


def test_fold_batchnorm_matches_conv_then_norm():
    conv = torch.nn.Conv3d(4, 6, (3, 1, 1), padding=(1, 0, 0))
    norm = _randomize(torch.nn.Sequential(torch.nn.BatchNorm3d(6)))[0]
    w, b = fold_batchnorm(conv, norm)
    x = torch.randn(2, 4, 5, 6, 7)
    with torch.no_grad():
        expected = norm(conv(x))
        got = torch.nn.functional.conv3d(x, w, b, padding=(1, 0, 0))
    assert torch.allclose(got, expected, atol=1e-5)


def test_fast_dcformer_outputs_equal_plain():
    model = _randomize(med3dvlm.create_model("dcformer_test"))
    fast = optimize_for_inference(model)
    assert any(isinstance(m, FusedDecompConv3d) for m in fast.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.modules())
    x = torch.rand(2, 1, 64, 48, 80)
    with torch.inference_mode():
        expected, got = model(x), fast(x)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert (e - g).abs().max().item() < 1e-4
    # the source model is untouched
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())


def test_fast_path_bf16_is_close():
    model = _randomize(med3dvlm.create_model("dcformer_test"))
    fast = optimize_for_inference(model, dtype=torch.bfloat16)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.inference_mode():
        e, g = model(x)[-1], fast(x)[-1]
    assert g.dtype == torch.bfloat16
    assert torch.allclose(g.float(), e, rtol=5e-2, atol=5e-2 * e.abs().max().item())


@pytest.mark.slow
def test_fast_dcformer_small_full_size_equal():
    model = _randomize(med3dvlm.create_model("dcformer_small"))
    fast = optimize_for_inference(model)
    x = torch.rand(1, 1, 128, 256, 256)
    with torch.inference_mode():
        for e, g in zip(model(x), fast(x)):
            assert (e - g).abs().max().item() < 1e-4
