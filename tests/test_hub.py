"""save_pretrained / from_pretrained round trip: exact weights, config and outputs."""

import json

import pytest
import torch

import med3dvlm
from med3dvlm.hub import CONFIG_NAME, WEIGHTS_NAME


def _randomize_batchnorm(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.num_batches_tracked.fill_(7)


@pytest.mark.parametrize("name", ["dcformer_test", "vit3d_test"])
def test_round_trip_is_exact(tmp_path, name):
    model = med3dvlm.create_model(name, preprocess={"window": "lung"}).eval()
    _randomize_batchnorm(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["preprocess"] == {"window": "lung"}

    loaded = med3dvlm.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 1, *model.config.input_size)
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(model(x), loaded(x)))
    assert not loaded.training


def test_class_from_pretrained_checks_the_type(tmp_path):
    from med3dvlm.models import DCFormer, ViT3D

    med3dvlm.create_model("vit3d_test").save_pretrained(tmp_path)
    assert isinstance(ViT3D.from_pretrained(tmp_path), ViT3D)
    with pytest.raises(TypeError, match="not a DCFormer"):
        DCFormer.from_pretrained(tmp_path)


def test_missing_or_mismatched_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        med3dvlm.from_pretrained(tmp_path)
    med3dvlm.create_model("dcformer_test").save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["dims"] = [8, 16, 16, 64]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match"):
        med3dvlm.from_pretrained(tmp_path)
