"""The quickstart end to end at a tiny scale (slow: it trains SmolLM2-135M on the CPU)."""

import json

import pytest


@pytest.mark.slow
def test_quickstart_runs_every_step_writes_results_json_and_resumes(tmp_path):
    from med3dvlm.quickstart import QuickstartBudget, run_quickstart

    budget = QuickstartBudget(cases=80, clip_steps=2, stage2_steps=2, stage3_steps=2, llm_layers=2, eval_images=4,
                              retrieval_pairs=5)
    page = run_quickstart(tmp_path, seed=1, budget=budget)
    text = page.read_text()
    for heading in ("## Does the model read the scan?", "## Retrieval (stage 1)", "## Test volumes"):
        assert heading in text
    assert (tmp_path / "model" / "llm").is_dir() and not (tmp_path / "model" / "lora").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seed"] == 1 and results["retrieval"]["n"] == 5
    assert results["closed_vqa"]["n"] == 20 and len(results["closed_vqa"]["strict"]["by_type"]) == 5  # 4 images x 5 types
    for key in ("zero", "swapped"):
        assert 0 <= results["ablation"][key]["closed_vqa_strict"] <= 100
    assert set(results["probe"]["by_type"]) == set(results["closed_vqa"]["strict"]["by_type"])
    assert results["yes_no"]["n"] == 20 and results["report"]["n"] == 4
    # The phantom's body window travels with the final model, for raw HU input (predict, app, API).
    assert json.loads((tmp_path / "model" / "vision" / "config.json").read_text())["preprocess"]["hu_window"] == "soft_tissue"
    first = json.loads((tmp_path / "timings.json").read_text())
    run_quickstart(tmp_path, seed=1, budget=budget)  # everything is skipped
    assert json.loads((tmp_path / "timings.json").read_text()) == first


@pytest.mark.parametrize("args, cases", [([], None), (["--cases", "120"], 120)])
def test_cli_cases_defaults_to_the_budget(tmp_path, monkeypatch, args, cases):
    """`--cases` has no default of its own: without it the run gets QuickstartBudget's, with it that number."""
    from med3dvlm import quickstart
    from med3dvlm.cli import main

    seen = {}

    def fake_run(out, seed, budget):
        seen["budget"] = budget
        page = tmp_path / "results.md"
        page.write_text("")
        summary = {"closed_vqa": {"strict": {"overall": 1.0}, "majority_baseline": 1.0},
                   "ablation": {"zero": {"closed_vqa_strict": 1.0}, "swapped": {"closed_vqa_strict": 1.0}},
                   "yes_no": {"balanced_accuracy": 1.0}, "report": {"finding_accuracy": 1.0},
                   "retrieval": {"ir_at_1": 1.0, "chance": 1.0}, "peak_rss_mb": 1.0}
        (tmp_path / "results.json").write_text(json.dumps(summary))
        return page

    monkeypatch.setattr(quickstart, "run_quickstart", fake_run)
    assert main(["quickstart", "--out", str(tmp_path), *args]) == 0
    expected = quickstart.QuickstartBudget().cases if cases is None else cases
    assert seen["budget"].cases == expected
    assert seen["budget"].clip_steps == quickstart.QuickstartBudget().clip_steps
