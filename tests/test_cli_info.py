import json

from med3dvlm.cli import main


def test_info_json_for_dcformer_small(capsys):
    assert main(["info", "dcformer_small", "--input", "128", "256", "256", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 18_244_800
    assert isinstance(data["gmac"], float) and abs(data["gmac"] - 21.36) < 0.01
    assert data["outputs"][-2:] == [[256, 384], [32, 768]]


def test_info_without_name_lists_every_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "dcformer_small" in out and "18,244,800" in out and "vit3d_base" in out and "87,389,184" in out


def test_info_unknown_model_exits_nonzero(capsys):
    assert main(["info", "dcformer_smal"]) == 2
    assert "dcformer_small" in capsys.readouterr().err
