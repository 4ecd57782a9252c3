"""The web app's event handlers called directly (the browser test covers the page): similar cases, display
windows, and what the page and the log show when a scan is broken. Needs gradio, not the fuzzer."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from med3dvlm.app import AUTO, create_demo, to_uint8  # noqa: E402
from med3dvlm.inference import Predictor  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from hostile_inputs import edit_dicom_series, lying_nifti, nifti_with_affine  # noqa: E402
from serving_helpers import hu_phantom, indexed_predictor, serving_files, write_dicom_series  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    return serving_files(tmp_path_factory.mktemp("app"), tiny_tokenizer)


@pytest.fixture(scope="module")
def handlers(files: dict[str, Path]) -> dict:
    demo = create_demo(indexed_predictor(files))
    assert "Find similar cases" in {b.value for b in demo.blocks.values() if isinstance(b, gr.Button)}
    return {f.fn.__name__: f.fn for f in demo.fns.values()}


def test_app_lists_similar_cases(handlers: dict, files: dict[str, Path]) -> None:
    loaded = handlers["load"](str(files["query"]))[0]
    assert not loaded.is_hu  # prepared [0, 1] data: plain display, no HU presets
    rows = handlers["similar"](loaded)
    assert [r[0] for r in rows] == [1, 2, 3, 4] and rows[0][2] == "case2" and rows[0][1] == pytest.approx(1.0, abs=1e-4)


def test_app_display_windows() -> None:
    hu = np.array([[-1000.0, -600.0, 40.0, 1000.0]])
    assert to_uint8(hu, "lung", True).tolist() == [[59, 127, 236, 255]]  # [-1350, 150] HU
    assert to_uint8(hu, "soft_tissue", True).tolist() == [[0, 0, 127, 255]]
    assert to_uint8(hu, "lung", False).tolist() == to_uint8(hu, AUTO, True).tolist()  # not HU: min-max
    assert to_uint8(np.full((3, 3), 7.0), AUTO, True).max() == 0  # constant slice: black, no division by zero


@pytest.mark.parametrize("kind", ["lying", "junk", "zero_spacing"])
def test_broken_scan_error_path_is_private(
    handlers: dict, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    """A broken upload gives a page message naming the upload and the reason; the log and the console
    hold neither the name nor gradio's temporary path (gradio printed every gr.Error)."""
    cache = tmp_path / "gradio" / "0123abcd"  # where gradio keeps an upload: a cache folder, the original name
    cache.mkdir(parents=True)
    name = "Doe_Jane_19610101.nii.gz"
    path = cache / name
    if kind == "lying":
        lying_nifti(path)
    elif kind == "junk":
        path.write_bytes(b"\x1f\x8b not gzip")
    else:
        nifti_with_affine(path, np.diag([1.0, 0.0, 1.0, 1.0]))
    with caplog.at_level(logging.DEBUG), pytest.raises(gr.Error) as info:
        handlers["load"](str(path))
    assert info.value.print_exception is False  # gradio would print it, traceback and all
    assert info.value.message.startswith(f"{name}: ") and str(cache) not in info.value.message
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert "Doe_Jane" not in text and str(cache) not in text


def test_unexpected_failure_is_shown_without_its_message(handlers: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("/tmp/gradio/x/Doe_Jane.nii.gz exploded")

    monkeypatch.setattr(Predictor, "prepare", boom)
    with caplog.at_level(logging.DEBUG), pytest.raises(gr.Error) as info:
        handlers["load"](str(tmp_path / "Doe_Jane.nii.gz"))
    assert "RuntimeError" in info.value.message and "Doe_Jane" not in info.value.message
    assert "RuntimeError" in caplog.text and "Doe_Jane" not in caplog.text


def test_slice_gaps_and_modality_shown_in_the_page(handlers: dict, tmp_path: Path) -> None:
    series = write_dicom_series(tmp_path / "series", hu_phantom((12, 24, 24)))
    edit_dicom_series(series, lambda k, ds: False if k == 6 else setattr(ds, "Modality", "MR"))
    out = handlers["load"](str(series))
    loaded, info = out[0], out[7]
    assert "uneven slice gaps" in info and "1 slice(s) missing" in info
    assert "modality MR, not CT" in info
    assert not loaded.is_hu  # no HU display presets for MR, whatever its value range
