"""Report and VQA evaluation end to end on a tiny random VLM and a small phantom dataset."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

import med3dvlm
from med3dvlm.eval import generation as gen
from med3dvlm.models.vlm import Med3DVLM

pytest.importorskip("nltk")
pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from med3dvlm.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, n=10, seed=0, size=(64, 64, 64), progress=False)
    return root


@pytest.fixture(scope="module")
def saved_vlm(tmp_path_factory, tiny_tokenizer):
    import torch

    torch.manual_seed(0)
    model = Med3DVLM(med3dvlm.get_config("med3dvlm_test"), tokenizer=copy.deepcopy(tiny_tokenizer)).eval()
    return model.save_pretrained(tmp_path_factory.mktemp("vlm") / "model")


@pytest.fixture(scope="module")
def vlm(saved_vlm):
    return gen.load_model(saved_vlm, "cpu")


def test_greedy_is_independent_of_batching_and_repeatable(vlm, phantom):
    from med3dvlm.data.datasets import VQADataset

    data = VQADataset(phantom / "M3D-VQA" / "M3D_VQA_test.csv", mode="closed", size=(64, 64, 64))
    one = gen.generate_answers(vlm, data, gen.GenerationSettings(max_new_tokens=5, batch_size=1), progress=False)
    many = gen.generate_answers(vlm, data, gen.GenerationSettings(max_new_tokens=5, batch_size=4), progress=False)
    assert len(one) == len(data) == 5  # one test image, one question of each type
    # Left padding and the attention mask must make a padded prompt decode exactly as it does alone.
    assert [r["prediction"] for r in one] == [r["prediction"] for r in many]
    assert all(" Choices: A. " in r["question"] for r in one)  # closed mode lists the choices


def test_seeded_sampling_is_reproducible(vlm, phantom):
    from med3dvlm.data.datasets import VQADataset

    data = VQADataset(phantom / "M3D-VQA" / "M3D_VQA_test.csv", mode="open", size=(64, 64, 64))
    runs = [
        [r["prediction"] for r in gen.generate_answers(vlm, data, gen.GenerationSettings.paper(max_new_tokens=6, seed=s), progress=False)]
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # a random 400-token LM sampling at T=1: another seed changes something


def test_report_evaluation_writes_tables(vlm, phantom, tmp_path):
    from med3dvlm.models.text import minilm_dir

    try:
        bert = minilm_dir()
    except FileNotFoundError:
        bert = None
    rows, summary = gen.evaluate_reports(
        vlm, phantom / "M3D_Cap.json", split="train", limit=3, settings=gen.GenerationSettings(max_new_tokens=4),
        bertscore=bert is not None, bertscore_model=bert, n_resamples=50, progress=False,
    )
    assert len(rows) == 3 and summary["data"]["samples"] == 3
    assert summary["generation"]["do_sample"] is False and summary["generation_effective"]["temperature"] is None
    for key in ("bleu1", "rouge1", "meteor", "bleu4_corpus", "rougeL") + (("bertscore_f1",) if bert else ()):
        stat = summary["metrics"][key]
        assert 0.0 <= stat["ci_low"] <= stat["mean"] <= stat["ci_high"] <= 1.0
    # The summary is the mean of the per-sample column it writes.
    assert summary["metrics"]["rouge1"]["mean"] == pytest.approx(sum(r["rouge1"] for r in rows) / 3)
    paths = gen.write_outputs(rows, summary, tmp_path, "tiny")
    frame = pd.read_csv(paths["predictions"])
    assert len(frame) == 3 and {"question", "answer", "prediction", "bleu1", "meteor"} <= set(frame.columns)
    tables = (tmp_path / "tables.md").read_text()
    assert "| Method | BLEU-1 | ROUGE-1 | METEOR |" in tables and "| tiny |" in tables
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["metric_settings"]["bertscore_model"] == (str(bert) if bert else None)


def test_cli_vqa_both_modes(saved_vlm, phantom, tmp_path):
    from med3dvlm.cli import main

    out = tmp_path / "vqa"
    code = main([
        "eval", "vqa", "--model", str(saved_vlm), "--data", str(phantom / "M3D-VQA" / "M3D_VQA_test.csv"),
        "--out", str(out), "--limit", "5", "--max-new-tokens", "3", "--no-bertscore", "--bootstrap", "20",
        "--device", "cpu", "--name", "tiny",
    ])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == {"closed": 5, "open": 5}
    assert set(summary["closed"]) == {"loose", "strict"} and "by_type" in summary["open"]
    assert summary["generation"]["max_new_tokens"] == 3 and summary["model"] == str(saved_vlm)
    frame = pd.read_csv(out / "predictions.csv")
    assert sorted(frame["mode"].unique()) == ["closed", "open"] and len(frame) == 10
    closed = frame[frame["mode"] == "closed"]
    expected = [float(f"{a}." in str(p if isinstance(p, str) else "")) for a, p in zip(closed["answer_choice"], closed["prediction"])]
    assert closed["correct_loose"].tolist() == expected
    tables = (out / "tables.md").read_text()
    assert "Closed-ended VQA accuracy (Table 3 layout)" in tables and "strict (chosen letter)" in tables
    assert "Open-ended VQA (Table 4 layout)" in tables
    assert (out / "closed_vqa_by_type.png").stat().st_size > 0 and (out / "open_vqa_by_type.png").stat().st_size > 0


def test_cli_errors_name_the_file(saved_vlm, tmp_path, capsys):
    from med3dvlm.cli import main

    missing = tmp_path / "nope.csv"
    code = main(["eval", "vqa", "--model", str(saved_vlm), "--data", str(missing), "--out", str(tmp_path / "o"), "--no-bertscore"])
    assert code == 1
    assert "nope.csv" in capsys.readouterr().err
    assert main(["eval", "vqa", "--model", str(saved_vlm), "--data", str(missing), "--out", str(tmp_path), "--mode", "x"]) == 2


def test_paper_settings_and_tables_from_a_summary():
    s = gen.GenerationSettings.paper()
    assert s.generate_kwargs() == {"max_new_tokens": 256, "do_sample": True, "num_beams": 1, "temperature": 1.0}
    assert gen.GenerationSettings().generate_kwargs() == {"max_new_tokens": 256, "do_sample": False, "num_beams": 1}
    stat = {"mean": 0.5, "ci_low": 0.25, "ci_high": 0.75, "n": 4}
    closed = {"loose": {"by_type": {1: stat, 3: stat}, "mean_over_types": 0.5, "overall": stat}}
    table = gen.closed_vqa_table(closed, "m")
    assert "| Method | scoring | Plane | Organ | Mean | Overall [95% CI] |" in table
    assert "| m | original (substring) | 50.00 | 50.00 | 50.00 | 50.00 [25.0, 75.0] |" in table
