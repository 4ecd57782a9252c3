"""Stage datasets on the phantom set: items, report truncation, augmentations, determinism and the skip policy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from med3dvlm.data import CaptionDataset, ImageReportDataset, VolumeError, VQADataset, load_image, train_transforms, write_phantom_dataset
from med3dvlm.data.m3d import CAP_JSON, VQA_DIR
from med3dvlm.data.text import split_sentences, truncate_report

SIZE = (16, 32, 32)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds")
    write_phantom_dataset(out, n=16, seed=2, size=SIZE, progress=False)
    return out


def test_split_sentences_keeps_decimals():
    assert split_sentences("A 2.5 cm cyst. No mass! Is it 3.1 mm? Yes") == ["A 2.5 cm cyst.", "No mass!", "Is it 3.1 mm?", "Yes"]


def test_truncation_keeps_first_sentence_and_budget():
    text = "First sentence here. Second one is longer than most. Third. Fourth sentence ends it."
    assert truncate_report(text, 100) == text
    assert truncate_report(text, 4) == "First sentence here. Third."  # eval: in order, skipping what does not fit
    assert truncate_report(text, 1) == "First sentence here."  # the first sentence is always kept
    outs = {truncate_report(text, 10, rng=np.random.default_rng(s)) for s in range(30)}
    assert len(outs) > 1 and all(o.startswith("First sentence here.") and len(o.split()) <= 10 for o in outs)
    chars = truncate_report(text, 40, count_tokens=len)  # any callable counts tokens
    assert chars.startswith("First") and sum(len(s) for s in split_sentences(chars)) <= 40


def test_image_report_items(root):
    ds = ImageReportDataset(root / CAP_JSON, split="test", max_tokens=12)
    item = ds[0]
    assert item["image"].shape == (1, *SIZE) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    full = (root / ds.items[0]["text"]).read_text()
    assert item["text"].startswith(split_sentences(full)[0]) and len(item["text"].split()) <= max(12, len(split_sentences(full)[0].split()))
    assert ds[0]["text"] == item["text"] and torch.equal(ds[0]["image"], item["image"])  # eval is deterministic


def test_train_mode_augments_and_is_seeded(root):
    ds = ImageReportDataset(root / CAP_JSON, split="train")
    assert ds.train and ds.transform is not None
    plain = load_image(root / ds.items[0]["image"])
    torch.manual_seed(0)
    a = [ds[0]["image"] for _ in range(6)]
    torch.manual_seed(0)
    b = [ds[0]["image"] for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, plain) for x in a)


def test_train_transforms_follow_the_paper():
    names = [type(t).__name__ for t in train_transforms().transforms]
    assert names == ["RandRotate90", "RandFlip", "RandFlip", "RandFlip", "RandScaleIntensity", "RandShiftIntensity", "ToTensor"]
    x = torch.rand(1, 8, 12, 12)
    out = train_transforms()(x)
    assert out.shape == (1, 8, 12, 12) and out.dtype == torch.float32  # rotation stays in the H-W plane


def test_caption_items(root):
    ds = CaptionDataset(root / CAP_JSON, split="validation")
    item = ds[0]
    assert item["task"] == "caption" and item["question"].endswith(("?", "."))
    assert item["answer"] == (root / ds.items[0]["text"]).read_text()


def test_vqa_closed_open_and_yes_no(root):
    closed = VQADataset(root / VQA_DIR / "M3D_VQA_test.csv", mode="closed")
    item = closed[0]
    assert item["question_type"] == 1 and item["question_type_name"] == "Plane"
    assert "Choices: A." in item["question"] and item["answer"].startswith(f"{item['answer_choice']}. ")
    assert item["choices"][item["answer_choice"]] == item["answer"].split(". ", 1)[1]
    opened = VQADataset(root / VQA_DIR / "M3D_VQA_test.csv", mode="open", question_types=(4,))
    assert len(opened) == len(closed) // 5 and all(opened[i]["question_type"] == 4 for i in range(len(opened)))  # one of 5 per image
    assert "Choices" not in opened[0]["question"]
    yn = VQADataset(root / VQA_DIR / "M3D_VQA_yn_train.csv", mode="open")
    assert yn[0]["answer"] in ("Yes", "No")


def test_dataloader_batches(root):
    ds = VQADataset(root / VQA_DIR / "M3D_VQA_train.csv", size=(8, 16, 16))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 8, 16, 16)
    assert len(batch["question"]) == 4 and batch["question_type"].tolist() == [1, 2, 3, 4]


def _broken_copy(root: Path, tmp_path: Path) -> Path:
    data = json.loads((root / CAP_JSON).read_text())
    items = data["train"][:4]
    items[1] = {"image": "M3D_Cap_npy/phantom/missing/Axial.npy", "text": items[1]["text"]}
    items[2] = {"image": "../../etc/passwd", "text": items[2]["text"]}
    path = root / "broken.json"
    path.write_text(json.dumps({"train": items, "validation": [], "test": []}))
    return path


def test_bad_items_raise_by_default(root, tmp_path):
    ds = ImageReportDataset(_broken_copy(root, tmp_path), split="train", train=False)
    ds[0]
    with pytest.raises(VolumeError, match="no such file|not a readable") as err:
        ds[1]
    assert "missing" in str(err.value)
    with pytest.raises(VolumeError, match="escapes the dataset root"):
        ds[2]


def test_skip_policy_counts_and_logs(root, tmp_path, caplog):
    ds = ImageReportDataset(_broken_copy(root, tmp_path), split="train", train=False, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="med3dvlm.data.datasets"):
        item = ds[1]
    assert item["index"] == 3  # the next good item in order, never a random one
    assert [i for i, _ in ds.skipped] == [1, 2]
    assert sum("skipped item" in r.message for r in caplog.records) == 2
    assert "escapes the dataset root" in ds.skipped[1][1]


def test_load_image_formats(root, tmp_path):
    import SimpleITK as sitk

    rel = json.loads((root / CAP_JSON).read_text())["train"][0]["image"]
    compact = load_image(root / rel)
    sitk.WriteImage(sitk.GetImageFromArray(compact[0].numpy()), str(tmp_path / "v.nii.gz"), useCompression=True)
    original = load_image(tmp_path / "v.nii.gz")  # the original's float32 .nii.gz
    torch.testing.assert_close(original, compact)
    np.save(tmp_path / "nan.npy", np.full(SIZE, np.nan, np.float32))
    with pytest.raises(VolumeError, match="NaN"):
        load_image(tmp_path / "nan.npy")
