import pytest
import torch

import med3dvlm
from med3dvlm.models import DCFormer, DCFormerConfig


def test_list_models_has_every_variant():
    names = med3dvlm.list_models()
    for name in ["dcformer_nano", "dcformer_naive", "dcformer_tiny", "dcformer_small", "dcformer_base",
                 "dcformer_large", "dcformer_test", "vit3d_base", "vit3d_test"]:
        assert name in names
    assert med3dvlm.list_models("vit3d_*") == ["vit3d_base", "vit3d_test"]


def test_unknown_name_lists_close_matches():
    with pytest.raises(KeyError, match="dcformer_small"):
        med3dvlm.create_model("dcformer_smal")


def test_overrides_apply_and_unknown_overrides_fail():
    model = med3dvlm.create_model("dcformer_test", depths=(1, 2, 1, 1))
    assert isinstance(model, DCFormer)
    assert len(model.stages[1].blocks) == 2
    with pytest.raises(TypeError, match="no field"):
        med3dvlm.get_config("dcformer_test", widht=3)


def test_config_json_round_trip_restores_tuples():
    config = med3dvlm.get_config("dcformer_small", preprocess={"window": "soft_tissue"})
    data = config.to_dict()
    assert data["model_type"] == "dcformer" and data["dims"] == [96, 192, 384, 768]
    again = DCFormerConfig.from_dict(data)
    assert again == config and isinstance(again.dims, tuple)
    with pytest.raises(ValueError, match="unknown"):
        DCFormerConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="model_type"):
        DCFormerConfig.from_dict({**data, "model_type": "vit3d"})


def test_inconsistent_config_is_rejected():
    with pytest.raises(ValueError, match="one entry per stage"):
        DCFormerConfig(dims=(8, 16), depths=(1,), kernel_sizes=(3, 3))


def test_models_build_on_meta_without_memory():
    with torch.device("meta"):
        model = med3dvlm.create_model("dcformer_large")
    assert next(model.parameters()).is_meta
