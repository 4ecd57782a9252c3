"""The quickstart end to end at a tiny scale (slow: it trains SmolLM2-135M on the CPU)."""

import json

import pytest


@pytest.mark.slow
def test_quickstart_runs_every_step_and_resumes(tmp_path):
    from med3dvlm.quickstart import run_quickstart

    page = run_quickstart(tmp_path, cases=40, clip_epochs=1, vlm_limit=8, eval_limit=4)
    text = page.read_text()
    for heading in ("## Retrieval (stage 1)", "Report generation (Table 2 layout)", "Closed-ended VQA", "## Test volumes"):
        assert heading in text
    assert (tmp_path / "model" / "llm").is_dir() and not (tmp_path / "model" / "lora").exists()
    summary = json.loads((tmp_path / "eval" / "vqa" / "summary.json").read_text())
    assert summary["samples"]["closed"] == 4
    first = json.loads((tmp_path / "timings.json").read_text())
    run_quickstart(tmp_path, cases=40, clip_epochs=1, vlm_limit=8, eval_limit=4)  # everything is skipped
    assert json.loads((tmp_path / "timings.json").read_text()) == first
