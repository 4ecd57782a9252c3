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
from torch import nn

import med3dvlm
from med3dvlm.cli import main
from med3dvlm.convert import convert_dcformer_checkpoint, load_state_dict


class _OrigDecompConv(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, duplicate_norms=False):
        super().__init__()
        norms = [nn.BatchNorm3d(cout) for _ in range(3)]
        if duplicate_norms:  # mirthAI/DCFormer registers the BatchNorms a second time
            self.norm = nn.ModuleList(norms)
        p = k // 2
        self.c1 = nn.Sequential(nn.Conv3d(cin, cout, (k, 1, 1), stride, (p, 0, 0), groups=groups), norms[0])
        self.c2 = nn.Sequential(nn.Conv3d(cin, cout, (1, k, 1), stride, (0, p, 0), groups=groups), norms[1])
        self.c3 = nn.Sequential(nn.Conv3d(cin, cout, (1, 1, k), stride, (0, 0, p), groups=groups), norms[2])

    def forward(self, x):
        return self.c1(x) + self.c2(x) + self.c3(x)


class _OrigMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.mlp(x)


class _OrigBlock(nn.Module):
    def __init__(self, cin, cout, k, downsample, scale_name, duplicate_norms):
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.pool = nn.MaxPool3d(3, 2, 1)
            self.proj = nn.Conv3d(cin, cout, 1, 1, 0, bias=False)
        self.dwconv = _OrigDecompConv(cout, cout, k, groups=cout, duplicate_norms=duplicate_norms)
        self.mlp = _OrigMlp(cout, 4 * cout)
        self.scale_name = scale_name
        self.register_parameter(scale_name, nn.Parameter(torch.rand(cout)))

    def forward(self, x):
        if self.downsample:
            x = self.proj(self.pool(x))
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)
        y = getattr(self, self.scale_name) * self.mlp(y)
        return x + y.permute(0, 4, 1, 2, 3)


class _OrigEncoder(nn.Module):
    def __init__(self, stem, dims, depths, kernels, scale_name="scale", duplicate_norms=False):
        super().__init__()
        dup = duplicate_norms
        self.s0 = nn.Sequential(nn.Sequential(
            _OrigDecompConv(1, stem, 7, 4, duplicate_norms=dup),
            *(_OrigDecompConv(stem, stem, 3, duplicate_norms=dup) for _ in range(3)),
        ))
        widths = [stem, *dims]
        for i, (d, n, k) in enumerate(zip(dims, depths, kernels)):
            blocks = [_OrigBlock(widths[i] if b == 0 else d, d, k, b == 0, scale_name, dup) for b in range(n)]
            setattr(self, f"s{i + 1}", nn.Sequential(*blocks))
        self.n_stages = len(dims) + 1

    def forward(self, x):
        x = x.permute(0, 1, 3, 4, 2)  # the original runs in (B, C, H, W, D)
        outs = []
        for i in range(self.n_stages):
            x = getattr(self, f"s{i}")(x)
            b, c, h, w, t = x.shape
            outs.append(x.permute(0, 4, 2, 3, 1).reshape(b, t * h * w, c))  # b c h w t -> b (t h w) c
        return outs


class _OrigModel(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.encoder = _OrigEncoder(**kw)

    def forward(self, x):
        return self.encoder(x)


def _randomized(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


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
    original = _randomized(_OrigModel(**TINY, scale_name=scale_name, duplicate_norms=duplicate_norms))
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
    original = _OrigModel(stem=64, dims=(96, 192, 384, 768), depths=(2, 3, 6, 2), kernels=(13, 11, 9, 7))
    model = convert_dcformer_checkpoint(original.state_dict())
    assert model.config == med3dvlm.get_config("dcformer_small")
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
