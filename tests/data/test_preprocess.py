"""PreprocessSpec: windowing and resize math, equality with MONAI, serialization, and range warnings."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from monai.transforms import CropForeground, Resize

from med3dvlm.data import IntensityWarning, PreprocessSpec, Volume, preprocess, preprocess_with_report
from med3dvlm.data.preprocess import WINDOW_PRESETS, apply_window, foreground_box, minmax, resize
from med3dvlm.data.volume import VolumeError


def test_window_math_soft_tissue():
    low, high = PreprocessSpec.ct("soft_tissue").hu_range
    assert (low, high) == (-160.0, 240.0)
    out = apply_window(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), low, high)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("name,expected", [("lung", (-1350.0, 150.0)), ("bone", (-500.0, 1300.0)), ("brain", (0.0, 80.0))])
def test_window_presets(name, expected):
    assert PreprocessSpec.ct(name).hu_range == expected
    assert set(WINDOW_PRESETS) >= {"soft_tissue", "lung", "bone", "brain"}


def test_explicit_window_range_overrides_preset():
    spec = PreprocessSpec(intensity="window", window="lung", window_range=(-1000, 1000))
    assert spec.hu_range == (-1000.0, 1000.0)


def test_minmax_math_and_constant_volume():
    np.testing.assert_allclose(minmax(np.array([10.0, 20.0, 60.0])), [0.0, 0.2, 1.0])
    assert not minmax(np.full((3, 3, 3), 7.0)).any()


@pytest.mark.parametrize("src,dst", [((10, 13, 17), (16, 32, 32)), ((40, 50, 60), (8, 16, 12)), ((7, 9, 11), (7, 18, 5))])
def test_resize_equals_monai_trilinear(src, dst):
    x = torch.rand(1, *src, generator=torch.Generator().manual_seed(0))
    ours = resize(x, dst)
    theirs = Resize(spatial_size=dst, mode="trilinear")(x)
    assert ours.shape == (1, *dst)
    torch.testing.assert_close(ours, torch.as_tensor(theirs), atol=1e-6, rtol=0)


def test_crop_foreground_equals_monai():
    x = np.zeros((10, 12, 14), np.float32)
    x[2:5, 3:11, 1:4] = np.random.default_rng(0).random((3, 8, 3)) + 0.1
    box = foreground_box(x)
    theirs = CropForeground(select_fn=lambda a: a > 0, allow_smaller=True)(x[None])
    np.testing.assert_array_equal(x[box], np.asarray(theirs)[0])
    assert foreground_box(np.zeros((3, 3, 3))) is None


def test_m3d_spec_equals_the_m3d_monai_chain():
    # The paper's preparation: min-max -> CropForeground(>0) -> Resize(trilinear).
    rng = np.random.default_rng(1)
    raw = np.zeros((20, 30, 26), np.float32)
    raw[3:17, 4:25, 2:20] = rng.integers(1, 256, size=(14, 21, 18))
    ours = preprocess(Volume(raw), PreprocessSpec.m3d(size=(16, 32, 32)))
    scaled = (raw - raw.min()) / (raw.max() - raw.min())
    cropped = CropForeground(select_fn=lambda a: a > 0, allow_smaller=True)(scaled[None])
    theirs = Resize(spatial_size=(16, 32, 32), mode="trilinear")(cropped)
    torch.testing.assert_close(ours, torch.as_tensor(np.asarray(theirs), dtype=torch.float32), atol=1e-6, rtol=0)


def test_output_contract(hu_volume):
    out, report = preprocess_with_report(Volume(hu_volume, modality="CT"), PreprocessSpec.ct("soft_tissue", size=(8, 16, 16)))
    assert out.shape == (1, 8, 16, 16) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert report.output["shape"] == [1, 8, 16, 16]
    assert report.warnings == []


def test_crop_then_resize_uses_the_body_box(hu_volume):
    # Air is outside the soft-tissue window (-> 0), so the crop keeps the water cylinder's box only.
    _, report = preprocess_with_report(Volume(hu_volume), PreprocessSpec.ct("soft_tissue", size=(8, 8, 8)))
    crop = next(s for s in report.steps if s.startswith("crop"))
    assert crop.endswith("[12, 15, 15]")


def test_reorientation_flips_axes_without_interpolation():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    ras = Volume(a, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert ras.orientation == "RAS"
    spec = PreprocessSpec(size=(2, 3, 4), intensity="minmax", crop_foreground=False)
    out = preprocess(ras, spec)[0].numpy()
    np.testing.assert_allclose(out, minmax(a[:, ::-1, ::-1]))
    keep = preprocess(ras, PreprocessSpec(size=(2, 3, 4), orientation=None, crop_foreground=False))[0].numpy()
    np.testing.assert_allclose(keep, minmax(a))


def test_resample_to_spacing_changes_shape_by_physical_extent(hu_volume):
    vol = Volume(hu_volume, spacing=(2.0, 1.0, 1.0))
    spec = PreprocessSpec.ct("soft_tissue", size=(8, 8, 8), spacing=(1.0, 2.0, 2.0), crop_foreground=False)
    _, report = preprocess_with_report(vol, spec)
    assert any(s.startswith("resample") and s.endswith("[24, 12, 10]") for s in report.steps)


def test_spec_round_trips_through_json():
    spec = PreprocessSpec.ct("lung", size=(32, 64, 64), spacing=(1.5, 0.8, 0.8))
    data = json.loads(json.dumps(spec.to_dict()))
    assert PreprocessSpec.from_dict(data) == spec
    assert isinstance(data["size"], list)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"intensity": "zscore"}, "intensity must be"),
        ({"intensity": "window"}, "needs a window"),
        ({"intensity": "window", "window": "liver"}, "unknown window preset"),
        ({"size": (1, 2)}, "three positive"),
        ({"window_range": (100, -100), "intensity": "window"}, "low < high"),
    ],
)
def test_spec_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        PreprocessSpec(**kwargs)
    with pytest.raises(ValueError, match="unknown PreprocessSpec fields"):
        PreprocessSpec.from_dict({"sise": [1, 2, 3]})


def test_for_model_default_and_stored():
    from med3dvlm import get_config
    from med3dvlm.config import ModelConfig

    config = get_config("dcformer_test")
    assert config.preprocess is None
    default = PreprocessSpec.for_model(config)
    assert default == PreprocessSpec.m3d(tuple(config.input_size))
    stored = PreprocessSpec.ct("lung", size=tuple(config.input_size))
    config = config.replace(preprocess=stored.to_dict())
    reloaded: ModelConfig = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
    assert PreprocessSpec.for_model(reloaded) == stored


def _no_warning(volume, spec):
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntensityWarning)
        preprocess(volume, spec)


def test_warns_when_hu_given_to_minmax_spec(hu_volume):
    with pytest.warns(IntensityWarning, match="raw Hounsfield units"):
        preprocess(Volume(hu_volume), PreprocessSpec.m3d(size=(4, 4, 4)))
    _no_warning(Volume(hu_volume), PreprocessSpec.ct("lung", size=(4, 4, 4)))


@pytest.mark.parametrize("kind,array", [("already normalized", np.linspace(0, 1, 64)), ("8-bit", np.arange(64) * 4)])
def test_warns_when_window_spec_gets_normalized_or_8bit(kind, array):
    array = array.reshape(4, 4, 4)
    array = array.astype(np.uint8) if kind == "8-bit" else array.astype(np.float32)
    with pytest.warns(IntensityWarning, match=kind):
        _, report = preprocess_with_report(Volume(array), PreprocessSpec.ct("soft_tissue", size=(4, 4, 4)))
    assert report.warnings
    _no_warning(Volume(array), PreprocessSpec.m3d(size=(4, 4, 4)))


def test_ct_window_on_mr_is_an_error_and_minmax_a_warning():
    # A HU window on MR values is noise fed to the model (issue 11): refused, naming the modality.
    mr = Volume(np.linspace(-300, 900, 64).reshape(4, 4, 4), modality="MR")
    with pytest.raises(VolumeError, match="modality MR: the preprocessing applies a CT Hounsfield window"):
        preprocess(mr, PreprocessSpec.ct(size=(4, 4, 4)))
    with pytest.warns(IntensityWarning, match="modality MR, not CT"):
        preprocess(mr, PreprocessSpec.m3d(size=(4, 4, 4)))


def test_load_for_model_uses_the_config_spec(tmp_path, hu_volume):
    import SimpleITK as sitk

    from med3dvlm import get_config
    from med3dvlm.cli import main
    from med3dvlm.data import load_for_model

    sitk.WriteImage(sitk.GetImageFromArray(hu_volume), str(tmp_path / "ct.nii.gz"))
    config = get_config("dcformer_test").replace(preprocess=PreprocessSpec.ct("lung", size=(8, 16, 16)).to_dict())
    image, report = load_for_model(tmp_path / "ct.nii.gz", config)
    assert image.shape == (1, 8, 16, 16) and report.warnings == []
    assert any("lung" in s for s in report.steps)
    # Without a stored spec the model's input size and the M3D default apply (and HU input is warned about).
    with pytest.warns(IntensityWarning):
        image, _ = load_for_model(tmp_path / "ct.nii.gz", get_config("dcformer_test"))
    assert image.shape == (1, *get_config("dcformer_test").input_size)
    assert main(["data", "inspect", str(tmp_path / "ct.nii.gz"), "--model", "dcformer_test", "--window", "lung", "--json"]) == 0
