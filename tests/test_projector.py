"""Projectors: the paper's Table 9 parameter counts, shapes, and conversion of original weights."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import med3dvlm
from med3dvlm.cli import main
from med3dvlm.convert import convert_projector_checkpoint, load_state_dict

TABLE_9 = {"mlp2x": 15_604_736, "mlp2x_h": 16_984_576, "mixer1x_h": 29_907_968, "mixer2x_h": 47_221_248}
TOKENS = {"mlp2x": 32, "mlp2x_h": 288, "mixer1x_h": 256, "mixer2x_h": 256}


@pytest.mark.parametrize("name", TABLE_9)
def test_table_9_counts_via_cli(name, capsys):
    import json

    assert main(["info", name, "--llm-dim", "3584", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == TABLE_9[name]
    assert data["outputs"] == [[TOKENS[name], 3584]]


@pytest.mark.parametrize("name", TABLE_9)
def test_forward_shapes_at_small_width(name):
    proj = med3dvlm.create_model(name, llm_dim=64)
    low, high = torch.randn(2, 256, 384), torch.randn(2, 32, 768)
    stage0 = torch.randn(2, 5, 7)  # earlier stages are ignored
    out = proj([stage0, low, high])
    assert out.shape == (2, TOKENS[name], 64) == (2, proj.num_output_tokens, 64)


def test_mixer_keeps_low_tokens_first():
    proj = med3dvlm.create_model("mixer2x_h", llm_dim=32).eval()
    low, high = torch.randn(1, 256, 384), torch.randn(1, 32, 768)
    out = proj([low, high])
    changed = proj([low, torch.randn(1, 32, 768)])
    assert torch.equal(out[:, :128], changed[:, :128]) and not torch.equal(out[:, 128:], changed[:, 128:])


def test_mixer_reproduces_the_original_code(assets):
    state = load_state_dict(assets / "original-mixer-projector" / "original_state_dict.safetensors")
    ref = load_file(assets / "original-mixer-projector" / "input_and_outputs.safetensors")
    proj = convert_projector_checkpoint({"model.mm_projector." + k: v for k, v in state.items()})
    assert proj.config.low_tokens_out == (192, 128) and proj.config.llm_dim == 256
    with torch.no_grad():
        out = proj([ref["low"], ref["high"]])
    assert out.shape == ref["output"].shape == (2, 256, 256)
    assert (out - ref["output"]).abs().max() < 1e-4


class _OrigMlp(nn.Module):  # the original MultiModalProjector's layout and names
    def __init__(self, cin, cout):
        super().__init__()
        self.mm_projector = nn.Sequential(nn.Linear(cin, cout), nn.Sequential(nn.GELU(), nn.Linear(cout, cout)))

    def forward(self, feats):
        return self.mm_projector(feats[1])


class _OrigLowHigh(nn.Module):  # the original LowHighHybridMLP's layout and names
    def __init__(self, low, high, cout):
        super().__init__()
        self.low_up_mlp, self.high_up_mlp = nn.Linear(low, cout), nn.Linear(high, cout)
        self.mm_projector = nn.Sequential(nn.GELU(), nn.Linear(cout, cout))

    def forward(self, feats):
        return self.mm_projector(torch.cat([self.low_up_mlp(feats[0]), self.high_up_mlp(feats[1])], dim=1))


@pytest.mark.parametrize("original", [_OrigMlp(768, 48), _OrigLowHigh(384, 768, 48)])
def test_mlp_projectors_convert(original):
    feats = [torch.randn(2, 256, 384), torch.randn(2, 32, 768)]
    proj = convert_projector_checkpoint(original.state_dict())
    with torch.no_grad():
        assert (proj(feats) - original(feats)).abs().max() < 1e-5


def test_round_trip(tmp_path):
    proj = med3dvlm.create_model("mixer2x_h_test")
    proj.save_pretrained(tmp_path)
    again = med3dvlm.from_pretrained(tmp_path)
    feats = [torch.randn(1, 8, 16), torch.randn(1, 1, 32)]
    with torch.no_grad():
        assert torch.equal(proj.eval()(feats), again(feats))


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="unknown projector kind"):
        med3dvlm.create_model("mixer2x_h", kind="qformer")
    with pytest.raises(ValueError, match="divisible"):
        med3dvlm.create_model("mixer2x_h", llm_dim=30)
    with pytest.raises(ValueError, match="last two encoder outputs"):
        med3dvlm.create_model("mixer2x_h_test")([torch.randn(1, 1, 32)])
