"""M3D formats read back, prepare-m3d-cap on generated slice folders, and case-level splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import CropForeground, Resize
from PIL import Image

from med3dvlm.cli import main
from med3dvlm.data import VolumeError
from med3dvlm.data.m3d import (
    CAP_JSON,
    DatasetFormatError,
    extract_report_text,
    find_root,
    read_cap_json,
    read_vqa_csv,
    resolve_in_root,
    write_cap_json,
    write_vqa_csv,
)
from med3dvlm.data.prepare import from_storage, m3d_chain, prepare_m3d_cap, read_slice_folder, write_slice_folder
from med3dvlm.data.splits import case_level_split, find_leakage, rewrite_split

SIZE = (8, 16, 16)


def test_extract_report_text_rules():
    assert extract_report_text("discussion: old notes\nstudy_findings: Liver cyst.\nSmall.") == "Liver cyst. Small."
    assert extract_report_text("study_findings:  \ndiscussion: A renal mass is seen.") == "A renal mass is seen."
    assert extract_report_text("study_findings: ab discussion: x") == "study_findings: ab discussion: x"
    assert extract_report_text("Plain report\nwith lines") == "Plain report with lines"


def test_cap_json_round_trip_with_subsets(tmp_path):
    items = [{"image": f"M3D_Cap_npy/c/{i:03d}/Axial.npy", "text": f"M3D_Cap_npy/c/{i:03d}/text.txt"} for i in range(1200)]
    write_cap_json(tmp_path / CAP_JSON, {"train": items[:10], "validation": items[10:20], "test": items[20:]})
    back = read_cap_json(tmp_path / CAP_JSON)
    assert len(back["test"]) == 1180 and len(back["test100"]) == 100 and len(back["test500"]) == 500
    assert back["test1k"] == back["test"][:1000]


@pytest.mark.parametrize(
    "payload,msg",
    [("{not json", "not valid JSON"), ('{"train": []}', "missing split"), ('{"train": [{"image": "a"}], "validation": [], "test": []}', "needs 'image' and 'text'")],
)
def test_cap_json_errors_name_the_file(tmp_path, payload, msg):
    (tmp_path / "bad.json").write_text(payload)
    with pytest.raises(DatasetFormatError, match=msg) as err:
        read_cap_json(tmp_path / "bad.json")
    assert "bad.json" in str(err.value)


def test_vqa_csv_round_trip_and_column_check(tmp_path):
    row = {"Image Path": "a/b.npy", "Text": "t", "Question Type": 3, "Question": "Which organ?", "Choice A": "Liver", "Choice B": "Spleen", "Answer": "Liver", "Answer Choice": "A"}
    write_vqa_csv(tmp_path / "v.csv", [row])
    frame = read_vqa_csv(tmp_path / "v.csv")
    assert frame.loc[0, "Choice C"] == "NA" and frame.loc[0, "Question Type"] == 3
    (tmp_path / "w.csv").write_text("Image Path,Question\nx,y\n")
    with pytest.raises(DatasetFormatError, match="missing column"):
        read_vqa_csv(tmp_path / "w.csv")


def test_path_escaping_the_root_is_refused(tmp_path):
    assert resolve_in_root(tmp_path, "a/b.npy") == (tmp_path / "a/b.npy").resolve()
    for bad in ("../outside.npy", "/etc/passwd", "a/../../x.npy"):
        with pytest.raises(VolumeError, match="escapes the dataset root"):
            resolve_in_root(tmp_path, bad)


def test_find_root_handles_the_original_layout(tmp_path):
    (tmp_path / "M3D_Cap_npy" / "c").mkdir(parents=True)
    (tmp_path / "M3D_Cap_npy" / "c" / "x.npy").write_bytes(b"")
    assert find_root(tmp_path / "M3D_Cap_npy" / CAP_JSON, "M3D_Cap_npy/c/x.npy") == tmp_path.resolve()
    assert find_root(tmp_path / CAP_JSON, "M3D_Cap_npy/c/x.npy") == tmp_path.resolve()


def test_m3d_chain_equals_monai():
    rng = np.random.default_rng(0)
    stack = np.zeros((12, 20, 18), np.float32)
    stack[2:10, 3:17, 4:15] = rng.random((8, 14, 11))
    ours = m3d_chain(stack, SIZE)
    x = (stack - stack.min()) / (stack.max() - stack.min())
    theirs = Resize(SIZE, mode="trilinear")(CropForeground(select_fn=lambda a: a > 0, allow_smaller=True)(x[None]))[0]
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-6)


def _raw_dataset(root: Path, n_cases: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(n_cases):
        case = root / "ct_case" / f"{c:06d}"
        for name in ("Axial_non_contrast", "Coronal_C__portal_venous_phase"):
            vol = np.zeros((10, 24, 24), np.float32)
            vol[2:8, 4:20, 5:19] = rng.uniform(0.2, 1.0, size=(6, 16, 14))
            write_slice_folder(case / name, vol)
        (case / "text.txt").write_text(f"discussion: d\nstudy_findings: Case {c} has a cyst.\n")
    return root


def test_read_slice_folder_sorts_by_integer_name_and_drops_odd_shapes(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for k in (0, 1, 2, 10, 11):  # lexical order would put 10 and 11 before 2
        Image.fromarray(np.full((6, 6), k * 10, np.uint8)).save(folder / f"{k}.png")
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(folder / "3.png")  # an odd slice
    Image.fromarray(np.full((6, 6), 30, np.uint8), mode="L").convert("P").save(folder / "4.png")  # palette image
    stack, dropped = read_slice_folder(folder)
    assert dropped == 1
    np.testing.assert_allclose(stack[:, 0, 0] * 255, [0, 10, 20, 30, 100, 110], atol=1e-4)
    (folder / "cover.png").write_bytes(b"")
    with pytest.raises(VolumeError, match="not an integer"):
        read_slice_folder(folder)


def test_prepare_converts_checks_and_resumes(tmp_path):
    src = _raw_dataset(tmp_path / "raw")
    blank = src / "ct_case" / "000001" / "Sagittal_blank"
    write_slice_folder(blank, np.zeros((4, 24, 24), np.float32))  # an all-zero series must be flagged
    out = tmp_path / "out"
    summary = prepare_m3d_cap(src, out, size=SIZE, workers=2, progress=False)
    assert summary["series"] == 7 and summary["ok"] == 6 and summary["flagged"] == 1
    data = read_cap_json(out / CAP_JSON)
    images = [it["image"] for s in ("train", "validation", "test") for it in data[s]]
    assert len(images) == 6 and not any("blank" in i for i in images)  # flagged volumes stay out
    assert find_leakage(data) == {}
    first = data["train"][0]
    arr = np.load(out / first["image"], mmap_mode="r")
    assert arr.shape == SIZE and arr.dtype == np.uint8
    assert (out / first["text"]).read_text().startswith("Case ")
    log = [json.loads(line) for line in (out / "prepare_log.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "flagged" and r["reason"] == "all zero" for r in log) == 1
    # The stored volume equals the paper's chain on the same slices, to uint8 rounding.
    stack, _ = read_slice_folder(src / Path(first["image"]).relative_to("M3D_Cap_npy").with_suffix(""))
    np.testing.assert_allclose(from_storage(np.asarray(arr)), m3d_chain(stack, SIZE), atol=0.5 / 255 + 1e-6)
    again = prepare_m3d_cap(src, out, size=SIZE, workers=1, progress=False)
    assert again["resumed"] == 6 and again["ok"] == 0 and again["flagged"] == 1


def test_prepare_with_the_paper_split_rewrites_stale_paths(tmp_path):
    src = _raw_dataset(tmp_path / "raw")
    paper = {
        "train": [{"image": "M3D_Cap_npy/ct_case/000000/Axial_non_contrast.nii.gz", "text": "stale"}],
        "validation": [],
        "test": [
            {"image": "M3D_Cap_npy/ct_case/000000/Coronal_C__portal_venous_phase.npy", "text": "stale"},
            {"image": "M3D_Cap_npy/ct_case/999999/Axial.npy", "text": "missing"},
        ],
    }
    (tmp_path / "paper.json").write_text(json.dumps(paper))
    summary = prepare_m3d_cap(src, tmp_path / "out", size=SIZE, workers=1, split="paper", paper_json=tmp_path / "paper.json", progress=False)
    data = read_cap_json(summary["json"])
    assert [it["image"] for it in data["train"]] == ["M3D_Cap_npy/ct_case/000000/Axial_non_contrast.npy"]
    assert len(data["test"]) == 1 and data["test"][0]["text"] == "M3D_Cap_npy/ct_case/000000/text.txt"
    assert all((tmp_path / "out" / it["image"]).exists() for it in data["train"] + data["test"])
    assert find_leakage(data) == {"M3D_Cap_npy/ct_case/000000": ["test", "train"]}  # the paper's leak, reported


def test_case_level_split_never_splits_a_case():
    items = [{"image": f"M3D_Cap_npy/c/{c:03d}/{s}.npy", "text": ""} for c in range(50) for s in ("a", "b", "c")[: 1 + c % 3]]
    splits = case_level_split(items, fractions=(0.8, 0.1, 0.1), seed=1)
    assert find_leakage(splits) == {}
    assert sum(len(v) for v in splits.values()) == len(items)
    assert splits == case_level_split(items, fractions=(0.8, 0.1, 0.1), seed=1)
    assert splits != case_level_split(items, fractions=(0.8, 0.1, 0.1), seed=2)
    cases = {s: {it["image"].rsplit("/", 1)[0] for it in v} for s, v in splits.items()}
    assert len(cases["validation"]) == 5 and len(cases["test"]) == 5


def test_rewrite_split_maps_nii_gz_to_npy():
    paper = {"train": [{"image": "x/1/A.nii.gz", "text": "?"}], "validation": [], "test": []}
    assert rewrite_split(paper, {"x/1/A.npy"})["train"] == [{"image": "x/1/A.npy", "text": "x/1/text.txt"}]


def test_cli_prepare_and_split(tmp_path, capsys):
    src = _raw_dataset(tmp_path / "raw", n_cases=2)
    assert main(["data", "prepare-m3d-cap", str(src), "--out", str(tmp_path / "o"), "--size", "8", "16", "16", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 4
    assert main(["data", "prepare-m3d-cap", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) != 0
    assert "nowhere" in capsys.readouterr().err
    assert main(["data", "split", str(tmp_path / "o" / CAP_JSON), "--out", str(tmp_path / "s.json")]) == 0
    assert find_leakage(read_cap_json(tmp_path / "s.json")) == {}


def test_storage_round_trip_precision():
    x = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    from med3dvlm.data.prepare import to_storage

    assert np.abs(from_storage(to_storage(x, "uint8")) - x).max() <= 0.5 / 255 + 1e-7
    assert np.abs(from_storage(to_storage(x, "float16")) - x).max() < 1e-3
    assert torch.is_tensor(torch.from_numpy(from_storage(to_storage(x))))


def test_worker_pool_survives_torch_threads_in_the_parent():
    # Forked workers hung forever in the trilinear resize once the parent had used torch's thread pool.
    from med3dvlm.data.prepare import process_pool

    m3d_chain(np.random.default_rng(0).random((64, 128, 128), dtype=np.float32), (64, 96, 96))
    pool = process_pool(2)
    try:
        futures = [pool.submit(m3d_chain, np.random.default_rng(i).random((48, 96, 96), dtype=np.float32), (64, 128, 128)) for i in range(2)]
        assert all(f.result(timeout=120).shape == (64, 128, 128) for f in futures)
    finally:
        for proc in list(pool._processes.values()):  # never wait on a hung worker
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
