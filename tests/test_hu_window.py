"""Raw HU into a model trained on windowed 8-bit images: the spec's `hu_window`, through predict, the REST API
and the web app, against values computed here from the known HU; models without one keep the old min-max."""

from __future__ import annotations

import base64
import copy
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import med3dvlm
from med3dvlm.cli import main as cli
from med3dvlm.data.preprocess import PreprocessSpec, preprocess_with_report
from med3dvlm.data.volume import Volume
from med3dvlm.inference import Predictor

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import hu_phantom, tiny_vlm_dir, write_nifti  # noqa: E402

SIZE = (64, 64, 64)  # med3dvlm_test's input: the scans below need no resize, so the values can be checked exactly
# No reorientation and no crop either: the model input is then the intensity step alone, voxel for voxel.
WINDOWED = PreprocessSpec.m3d(SIZE, hu_window="soft_tissue").to_dict() | {"orientation": None, "crop_foreground": False}


def save_vlm(root: Path, tokenizer, preprocess: dict | None) -> Path:
    """The tiny test VLM saved with `preprocess` as its encoder's stored spec."""
    from med3dvlm.models.vlm import Med3DVLM

    model = Med3DVLM(med3dvlm.get_config("med3dvlm_test"), tokenizer=copy.deepcopy(tokenizer)).eval()
    model.vision.config = model.vision.config.replace(preprocess=preprocess)
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hu_window")
    hu = hu_phantom(SIZE, seed=3)  # air (-1000), water (40), a bone rod (900), a lesion, plus a 0..63 HU slice ramp
    old = tiny_vlm_dir(root / "plain", tokenizer=tiny_tokenizer)
    # An encoder config.json written before hu_window existed: the field is absent, not null.
    spec_file = old / "vision" / "config.json"
    config = json.loads(spec_file.read_text())
    config["preprocess"] = {k: v for k, v in WINDOWED.items() if k != "hu_window"}
    spec_file.write_text(json.dumps(config))
    np.save(root / "unit.npy", np.random.default_rng(0).random(SIZE, dtype=np.float32))
    return {
        "windowed": save_vlm(root / "windowed", tiny_tokenizer, WINDOWED),
        "old": old,
        "nifti": write_nifti(root / "scan.nii.gz", hu),
        "unit": root / "unit.npy",
    }


@pytest.fixture(scope="module")
def hu_values() -> np.ndarray:
    """The HU as stored (write_nifti rounds to int16), in (D, H, W)."""
    return np.round(hu_phantom(SIZE, seed=3)).astype(np.int16).astype(np.float64)


def expected_input(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Window [level - width/2, level + width/2] to [0, 1] as a display does, then M3D's min-max."""
    low, high = level - width / 2, level + width / 2
    shown = (np.clip(hu, low, high) - low) / (high - low)
    return (shown - shown.min()) / (shown.max() - shown.min())


@pytest.fixture(scope="module")
def predictor(files: dict[str, Path]) -> Predictor:
    return Predictor.from_dir(files["windowed"])


def test_spec_fields_validate_and_round_trip() -> None:
    for window in ("lung", {"level": 50, "width": 350}):
        spec = PreprocessSpec.m3d((8, 16, 16), hu_window=window)
        assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert PreprocessSpec(hu_window={"level": 50, "width": 350}).hu_window == {"level": 50.0, "width": 350.0}
    for bad in ("abdomen", {"level": 40}, {"level": 40, "width": 0}, {"low": -160, "high": 240}):
        with pytest.raises(ValueError, match="hu_window"):
            PreprocessSpec(hu_window=bad)
    with pytest.raises(ValueError, match='intensity="window" windows every input'):
        PreprocessSpec(intensity="window", window="lung", hu_window="lung")
    # A spec saved before the field existed loads, without a window.
    old = {k: v for k, v in PreprocessSpec().to_dict().items() if k != "hu_window"}
    assert PreprocessSpec.from_dict(old).hu_window is None


def test_predict_windows_raw_hu(predictor: Predictor, files: dict[str, Path], hu_values: np.ndarray) -> None:
    assert predictor.spec.hu_window == "soft_tissue"  # read from the saved model's vision/config.json
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # windowed HU is what the model expects: nothing to warn about
        prepared = predictor.prepare(files["nifti"])
    np.testing.assert_allclose(prepared.tensor[0].numpy(), expected_input(hu_values, 40, 400), atol=1e-6)
    pre = prepared.preprocessing
    assert pre["steps"][0] == "HU window W400/L40 (soft_tissue) applied: [-160, 240] HU -> [0, 1] (the model was trained on windowed images)"
    assert pre["hu_window"] == {"level": 40.0, "width": 400.0, "low": -160.0, "high": 240.0, "name": "soft_tissue"}
    assert pre["warnings"] == [] and pre["spec"]["hu_window"] == "soft_tissue"


def test_level_width_window_and_other_modalities(hu_values: np.ndarray) -> None:
    # Wider than the volume's values, so the min-max after the window (M3D's, on the 8-bit images) matters too.
    spec = PreprocessSpec.from_dict({**WINDOWED, "hu_window": {"level": 0, "width": 4000}})
    tensor, report = preprocess_with_report(Volume(hu_values.astype(np.float32), modality="CT"), spec)
    np.testing.assert_allclose(tensor[0].numpy(), expected_input(hu_values, 0, 4000), atol=1e-6)
    assert report.steps[0] == "HU window W4000/L0 applied: [-2000, 2000] HU -> [0, 1] (the model was trained on windowed images)"
    assert report.steps[1] == "min-max [0.25, 0.74075] -> [0, 1]"
    # MR values are not Hounsfield units, whatever their range: the old path, warned.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = preprocess_with_report(Volume(hu_values.astype(np.float32), modality="MR"), spec)
    assert report.hu_window is None and report.steps[0].startswith("min-max [-1000, ")
    assert len(caught) == 2 and "modality MR" in str(caught[0].message) and "Hounsfield" in str(caught[1].message)


def test_already_windowed_input_is_not_windowed_again(predictor: Predictor, files: dict[str, Path]) -> None:
    pre = predictor.prepare(files["unit"]).preprocessing
    assert pre["hu_window"] is None and [s.split(" [")[0] for s in pre["steps"]] == ["min-max"]


def test_model_without_a_window_keeps_the_old_min_max(files: dict[str, Path], hu_values: np.ndarray) -> None:
    old = Predictor.from_dir(files["old"])
    assert old.spec.hu_window is None
    prepared = old.prepare(files["nifti"])
    expected = (hu_values - hu_values.min()) / (hu_values.max() - hu_values.min())
    np.testing.assert_allclose(prepared.tensor[0].numpy(), expected, atol=1e-6)
    pre = prepared.preprocessing
    assert pre["hu_window"] is None and pre["steps"] == [f"min-max [{hu_values.min():g}, {hu_values.max():g}] -> [0, 1]"]
    assert any("Hounsfield" in w and "hu_window" in w for w in pre["warnings"])


def test_cli_reports_the_window(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    args = ["predict", "-m", str(files["windowed"]), "-i", str(files["nifti"]), "--max-new-tokens", "3"]
    capsys.readouterr()
    assert cli([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preprocessing"]["hu_window"]["name"] == "soft_tissue"
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert "note: HU window W400/L40 (soft_tissue) applied" in err and "warning" not in err


def test_rest_apis_and_web_app_report_the_window(predictor: Predictor, files: dict[str, Path], hu_values: np.ndarray) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from med3dvlm.api import create_app

    client = TestClient(create_app(predictor))
    r = client.post("/report", files={"file": ("scan.nii.gz", files["nifti"].read_bytes())}, data={"max_new_tokens": "3"})
    assert r.status_code == 200, r.text
    assert r.json()["preprocessing"]["steps"][0].startswith("HU window W400/L40 (soft_tissue) applied")
    assert r.json()["text"] == predictor.predict(files["nifti"], max_new_tokens=3).text
    scan = {"type": "file", "file": {"file_data": base64.b64encode(files["nifti"].read_bytes()).decode(), "filename": "scan.nii.gz"}}
    r = client.post("/v1/chat/completions", json={"model": "windowed", "max_completion_tokens": 3,
                                                  "messages": [{"role": "user", "content": [scan]}]})
    assert r.status_code == 200, r.text
    assert r.json()["preprocessing"]["hu_window"]["name"] == "soft_tissue" and r.json()["preprocessing"]["warnings"] == []

    gr = pytest.importorskip("gradio")
    from med3dvlm.app import create_demo

    handlers = {f.fn.__name__: f.fn for f in create_demo(predictor).fns.values()}
    out = handlers["load"](str(files["nifti"]))
    loaded, summary = out[0], out[7]
    np.testing.assert_allclose(loaded.prepared.tensor[0].numpy(), expected_input(hu_values, 40, 400), atol=1e-6)
    assert "HU window W400/L40 (soft_tissue) applied" in summary
    assert isinstance(out[-1], dict) and out[-1]["value"] == "soft_tissue" and gr is not None
