"""Case search: index a dataset or a folder, query by image and by text, group by case, CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from med3dvlm.cli import main as cli
from med3dvlm.data.m3d import read_cap_json
from med3dvlm.search import CaseIndex, SearchIndexError, build_index, top_k

sys.path.insert(0, str(Path(__file__).parent))
from clip_helpers import tiny_model_dir, tiny_phantom  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("search")
    cap_json, model_dir = tiny_phantom(root / "data"), tiny_model_dir(root / "model")
    build_index(model_dir, cap_json, root / "index", progress=False)
    return cap_json, model_dir, root / "index"


def test_image_query_finds_its_own_case_first(built: tuple[Path, Path, Path]) -> None:
    cap_json, _, index_dir = built
    idx = CaseIndex(index_dir, device="cpu")
    items = [it for s in ("train", "validation", "test") for it in read_cap_json(cap_json)[s]]
    assert len(idx) == len(items) and idx.meta["has_text"]
    query = items[len(items) // 2]
    hits = idx.search_image(cap_json.parent / query["image"], k=3)
    assert hits[0].image == query["image"] and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.rank for h in hits] == [1, 2, 3] and len({h.case for h in hits}) == 3  # one hit per case
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    assert hits[0].report and "CT of the" in hits[0].report
    series = idx.search_image(cap_json.parent / query["image"], k=len(items), per_case=False)
    assert len(series) == len(items)


def test_text_query_against_images_and_reports(built: tuple[Path, Path, Path]) -> None:
    idx = CaseIndex(built[2], device="cpu")
    for against in ("image", "text"):
        hits = idx.search_text("hypodense cyst in the liver", k=4, against=against)
        assert len(hits) == 4 and all(-1.0 - 1e-5 <= h.score <= 1.0 + 1e-5 for h in hits)
    own = idx.meta["items"][0]
    assert idx.search_text(own["report"], k=1, against="text")[0].case == own["case"]


def test_folder_index_and_cli(built: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cap_json, model_dir, _ = built
    folder = tmp_path / "scans"
    images = sorted((cap_json.parent / "M3D_Cap_npy").rglob("*.npy"))[:5]
    for i, p in enumerate(images):
        (folder / f"patient{i}").mkdir(parents=True)
        shutil.copy(p, folder / f"patient{i}" / p.name)
    assert cli(["index", "build", "-m", str(model_dir), "-d", str(folder), "-o", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert cli(["search", "-i", str(tmp_path / "idx"), "--image", str(images[2]), "-k", "2", "--json", "--device", "cpu"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["case"] == "patient2" and hits[0]["report"] is None and len(hits) == 2
    assert cli(["search", "-i", str(tmp_path / "idx"), "--text", "mass", "--against", "text"]) == 1
    assert "no 'text' embeddings" in capsys.readouterr().err
    assert cli(["search", "-i", str(tmp_path / "idx")]) == 2
    with pytest.raises(SearchIndexError, match="index.json: missing"):
        CaseIndex(tmp_path)


def test_top_k_chunked_equals_full() -> None:
    g = torch.Generator().manual_seed(0)
    db, q = torch.randn(1000, 16, generator=g), torch.randn(3, 16, generator=g)
    s, i = top_k(db, q, 7, chunk=64)
    s_ref, i_ref = (q @ db.T).topk(7, dim=1)
    torch.testing.assert_close(s, s_ref)
    assert torch.equal(i, i_ref)
