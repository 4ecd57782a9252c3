"""Retrieval evaluation: the first-N protocol, agreement with the metric functions, report files and the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from med3dvlm.cli import main as cli
from med3dvlm.data.datasets import ImageReportDataset
from med3dvlm.eval.retrieval import embed_pairs, evaluate_retrieval, markdown_table, write_retrieval_report
from med3dvlm.hub import from_pretrained
from med3dvlm.metrics.retrieval import retrieval_metrics
from med3dvlm.models.text import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from clip_helpers import TINY_SIZE, tiny_model_dir, tiny_phantom  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("retrieval")
    return tiny_phantom(root / "data"), tiny_model_dir(root / "model")


def test_first_n_pairs_and_metric_agreement(setup: tuple[Path, Path]) -> None:
    cap_json, model_dir = setup
    model, tok = from_pretrained(model_dir), load_tokenizer(model_dir)
    res = evaluate_retrieval(model, tok, cap_json, split="test", sizes=(2, 3, 10_000), batch_size=2, progress=False)
    assert sorted(res["by_size"]) == [2, 3]  # sizes beyond the split are skipped
    assert res["chance"][2][1] == 0.5
    # Independent check: embed the split ourselves and score the prefixes with the metric function.
    ds = ImageReportDataset(cap_json, split="test", size=TINY_SIZE, train=False)
    img, txt = embed_pairs(model, tok, ds, batch_size=3, progress=False)
    for n in (2, 3):
        expected = retrieval_metrics(img[:n], txt[:n])
        assert res["by_size"][n] == pytest.approx(expected)
    # Embedding does not depend on the batch size (eval mode, no augmentation).
    img1, txt1 = embed_pairs(model, tok, ds, batch_size=1, progress=False)
    torch.testing.assert_close(img1, img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt1, txt, atol=1e-5, rtol=1e-4)


def test_report_files(tmp_path: Path) -> None:
    res = {
        "paper": {"cap_json": "a.json", "split": "test", "pairs": 500, "by_size": {100: {f"{d}@{k}": 0.5 for d in ("IR", "TR") for k in (1, 5, 10)}}},
        "case": {"cap_json": "b.json", "split": "test", "pairs": 100, "by_size": {100: {f"{d}@{k}": 0.25 for d in ("IR", "TR") for k in (1, 5, 10)}}},
    }
    paths = write_retrieval_report(res, tmp_path)
    data = json.loads(Path(paths["json"]).read_text())
    assert data["paper"]["by_size"]["100"]["IR@1"] == 0.5
    md = Path(paths["markdown"]).read_text()
    assert "| 100 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 1.0 |" in md and "### case" in md
    assert Path(paths["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown_table(data) == markdown_table(res)  # string keys after a JSON round trip work too


def test_cli_two_splits(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cap_json, model_dir = setup
    code = cli(["eval", "retrieval", "-m", str(model_dir), "--data", f"paper={cap_json}", "--data", f"case={cap_json}",
                "-o", str(tmp_path), "-n", "2", "--split", "test", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "### paper" in out and "### case" in out
    data = json.loads((tmp_path / "retrieval.json").read_text())
    assert data["paper"]["by_size"] == data["case"]["by_size"]
    assert cli(["eval", "retrieval", "-m", str(model_dir), "--data", str(cap_json), "-o", str(tmp_path), "--split", "nope"]) == 1
    assert "no split 'nope'" in capsys.readouterr().err
