"""`med3dvlm predict` and the `Predictor`: NIfTI, DICOM folders and zips, --json, --batch, bad input."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

from med3dvlm.cli import main as cli
from med3dvlm.data.volume import VolumeError
from med3dvlm.inference import Predictor
from med3dvlm.uploads import extract_zip

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import hu_phantom, tiny_vlm_dir, write_dicom_series, write_nifti, zip_folder  # noqa: E402

TOKENS = ["--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    return {
        "model": tiny_vlm_dir(root / "model", tiny_tokenizer),
        "nifti": write_nifti(root / "scans" / "case1.nii.gz", hu_phantom(seed=0)),
        "nifti2": write_nifti(root / "scans" / "case2.nii", hu_phantom(seed=1)),
        "dicom": write_dicom_series(root / "scans" / "case3", hu_phantom(seed=2)),
        "root": root,
    }


@pytest.fixture(scope="module")
def predictor(scans: dict[str, Path]) -> Predictor:
    return Predictor.from_dir(scans["model"])


def run_json(capsys: pytest.CaptureFixture, args: list[str]) -> dict:
    capsys.readouterr()
    assert cli(["predict", *args, *TOKENS, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_nifti_report_json(scans: dict[str, Path], predictor: Predictor, capsys: pytest.CaptureFixture) -> None:
    result = run_json(capsys, ["-m", str(scans["model"]), "-i", str(scans["nifti"])])
    assert result["task"] == "report" and result["question"] is None
    # The CLI runs the saved model: greedy decoding gives exactly the library's text.
    assert result["text"] == predictor.predict(scans["nifti"], max_new_tokens=6).text
    pre = result["preprocessing"]
    assert pre["input"]["shape"] == [20, 40, 36] and pre["input"]["looks_like"] == "hu"
    assert pre["steps"][-1] == "resize [20, 40, 36] -> [64, 64, 64] (trilinear, align_corners=False)"
    assert any(s.startswith("min-max [-1000, ") for s in pre["steps"])
    assert pre["output"]["shape"] == [1, 64, 64, 64] and pre["spec"]["size"] == [64, 64, 64]
    # Raw HU into a min-max model is allowed but flagged, naming the file.
    assert any(str(scans["nifti"]) in w and "Hounsfield" in w for w in pre["warnings"])
    assert result["generation"] == {"max_new_tokens": 6, "do_sample": False, "temperature": 1.0, "top_p": None, "seed": None}
    assert set(result["timings"]) == {"read_s", "generate_s"} and result["model"] == "model"


def test_question_and_sampling_settings(scans: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    args = ["-m", str(scans["model"]), "-i", str(scans["nifti"]), "-q", "Is there a lesion in the liver?"]
    first = run_json(capsys, [*args, "--sample", "--seed", "7", "--top-p", "0.9"])
    assert first["task"] == "vqa" and first["question"] == "Is there a lesion in the liver?"
    assert first["generation"]["do_sample"] is True and first["generation"]["seed"] == 7
    assert run_json(capsys, [*args, "--sample", "--seed", "7", "--top-p", "0.9"])["text"] == first["text"]


def test_dicom_folder_and_zip_agree(scans: dict[str, Path], predictor: Predictor, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert cli(["predict", "-m", str(scans["model"]), "-i", str(scans["dicom"]), *TOKENS]) == 0
    out = capsys.readouterr()
    expected = predictor.predict(scans["dicom"], max_new_tokens=6)
    assert out.out.strip() == expected.text
    assert "Hounsfield" in out.err  # warnings go to stderr, the text alone to stdout
    pre = expected.preprocessing
    assert pre["input"]["modality"] == "CT" and pre["input"]["meta"]["num_slices"] == 20
    assert "DOE" not in json.dumps(pre) and "PID-0042" not in json.dumps(pre)  # no patient fields in results
    archive = zip_folder(scans["dicom"], scans["root"] / "case3.zip")
    zipped = run_json(capsys, ["-m", str(scans["model"]), "-i", str(archive)])
    assert zipped["text"] == expected.text
    assert zipped["preprocessing"]["output"] == pre["output"]
    assert zipped["preprocessing"]["input"]["source"] == str(archive)  # not the temporary folder


def test_batch_folder_jsonl_with_a_bad_scan(scans: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results.jsonl"
    capsys.readouterr()
    assert cli(["predict", "-m", str(scans["model"]), "--batch", str(scans["root"] / "scans"), "-o", str(out), "--batch-size", "2", *TOKENS]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["source"]).name for r in rows) == ["case1.nii.gz", "case2.nii", "case3"]
    assert all(r["task"] == "report" and isinstance(r["text"], str) for r in rows)
    assert "predict" in capsys.readouterr().err  # the progress bar

    bad = tmp_path / "scans"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    write_nifti(bad / "ok.nii.gz", hu_phantom(seed=3))
    assert cli(["predict", "-m", str(scans["model"]), "--batch", str(bad), *TOKENS]) == 1
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert [("error" in r, Path(r["source"]).name) for r in rows] == [(True, "broken.nii.gz"), (False, "ok.nii.gz")]
    assert "1 of 2 scans could not be read" in captured.err


def test_batch_csv_with_questions(scans: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "cases.csv"
    table.write_text(f"image,question\n{scans['nifti']},What organ is abnormal?\n{scans['dicom']},\n")
    capsys.readouterr()
    assert cli(["predict", "-m", str(scans["model"]), "--batch", str(table), *TOKENS]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["task"], r["question"]) for r in rows] == [("vqa", "What organ is abnormal?"), ("report", None)]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["-i", "{missing}"], 2, "no such file or directory"),
        ([], 2, "exactly one of --image"),
        (["-i", "{nifti}", "--batch", "{nifti}"], 2, "exactly one of --image"),
        (["--batch", "{nifti}"], 2, "takes a folder of scans or a .csv"),
        (["-i", "{corrupt}"], 1, "corrupt.nii.gz: not a readable NIfTI file (truncated"),
        (["-i", "{flat}"], 1, "flat.npy: a 2D image"),
    ],
)
def test_bad_input_exit_codes(scans: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], code: int, message: str) -> None:
    import gzip

    import numpy as np

    # A valid gzip stream holding a NIfTI cut after its header: the voxel data are missing.
    (tmp_path / "corrupt.nii.gz").write_bytes(gzip.compress(gzip.decompress(scans["nifti"].read_bytes())[:400]))
    np.save(tmp_path / "flat.npy", np.zeros((32, 32), np.float32))
    names = {"missing": tmp_path / "nope.nii.gz", "nifti": scans["nifti"], "corrupt": tmp_path / "corrupt.nii.gz", "flat": tmp_path / "flat.npy"}
    capsys.readouterr()
    assert cli(["predict", "-m", str(scans["model"]), *[a.format(**names) for a in args]]) == code
    assert message in capsys.readouterr().err


def test_not_a_model_folder(tmp_path: Path, scans: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert cli(["predict", "-m", str(tmp_path), "-i", str(scans["nifti"])]) == 1
    assert "no config.json; not a saved med3dvlm model folder" in capsys.readouterr().err


def test_unsafe_zips_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.dcm", b"x")
    with pytest.raises(VolumeError, match=r"evil.zip: unsafe path"):
        extract_zip(evil, tmp_path / "out")
    assert not (tmp_path.parent / "escape.dcm").exists()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * 3_000_000)  # compresses to a few kB
    with pytest.raises(VolumeError, match=r"unzips to more than 1 MB"):
        extract_zip(bomb, tmp_path / "out2", max_bytes=1024**2)
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK junk")
    with pytest.raises(VolumeError, match=r"junk.zip: not a readable zip"):
        extract_zip(junk, tmp_path / "out3")
