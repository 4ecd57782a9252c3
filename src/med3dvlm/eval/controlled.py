"""Held-out evaluation with its controls, on an M3D-format dataset with ground truth (the phantom's).

`evaluate_with_controls` answers, on the first `n_images` test images:

- every closed question three times, with the real volume, a zeroed one and another case's (`grounding`),
  scored with the strict letter rule, beside the image-free text-prior baseline;
- the yes/no questions (balanced accuracy, yes-rate against the true yes-rate);
- a report per image (or the first `n_reports`), read for its findings against the case's ground truth (`findings`).

It returns the numbers (percentages, 0-100) and the per-question rows for `predictions` files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
from torch.utils.data import Subset

from ..data.m3d import choice_columns, read_vqa_csv
from ..metrics.vqa import QUESTION_TYPE_NAMES, closed_vqa_metrics
from .findings import findings_summary, score_report
from .generation import GenerationSettings, generate_answers
from .grounding import ImageAblation, follows_swapped, swap_partners, text_prior_baseline, yes_no_metrics

logger = logging.getLogger(__name__)


def question_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """M3D-VQA rows as dicts with the bare question, its type, answer text, answer letter and choices."""
    return [
        {"image": str(r["Image Path"]), "question": str(r["Question"]), "question_type": int(r["Question Type"]),
         "answer": str(r["Answer"]), "answer_choice": str(r["Answer Choice"]), "choices": choice_columns(r)}
        for _, r in frame.iterrows()
    ]


def first_images(frame: pd.DataFrame, n: int) -> list[str]:
    """The first `n` distinct images of a VQA CSV, in file order."""
    return list(dict.fromkeys(frame["Image Path"].astype(str)))[:n]


def evaluate_with_controls(
    model: Any,
    data_root: str | os.PathLike,
    n_images: int = 32,
    batch_size: int = 16,
    n_reports: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(results, rows): see the module docstring. `data_root` holds M3D_Cap.json, M3D-VQA/ and phantom_truth.json.

    Reports, the slowest to generate, are written for the first `n_reports` of the images only (all when None).
    """
    from ..data.datasets import CaptionDataset, VQADataset

    root = Path(data_root)
    vqa_dir = root / "M3D-VQA"
    size = tuple(model.vision.config.input_size)
    test_frame = read_vqa_csv(vqa_dir / "M3D_VQA_test.csv")
    images = first_images(test_frame, n_images)
    chosen = set(images)
    # The prompt lists the choices as M3D does; "answer" is the choice text, which the donor comparison needs.
    closed = VQADataset(vqa_dir / "M3D_VQA_test.csv", mode="closed", size=size, closed_answer="text")  # type: ignore[arg-type]
    keep = [i for i, p in enumerate(closed.rows["Image Path"].astype(str)) if p in chosen]
    bare = {i: str(closed.rows.iloc[i]["Question"]) for i in keep}
    donors = swap_partners(images, seed=seed)
    short = GenerationSettings(max_new_tokens=8, batch_size=batch_size)

    rows: dict[str, list[dict[str, Any]]] = {}
    strict: dict[str, dict[str, Any]] = {}
    for mode in ("real", "zero", "swapped"):
        logger.info("closed VQA, %s volumes: %d questions", mode, len(keep))
        dataset = ImageAblation(Subset(closed, keep), mode, donors)
        answered = generate_answers(model, dataset, short, progress=progress)
        result = closed_vqa_metrics([r["prediction"] for r in answered], [r["answer_choice"] for r in answered],
                                    [r["question_type"] for r in answered], [r["choices"] for r in answered], n_resamples=200)
        for row, letter, ok in zip(answered, result["per_sample"]["chosen"], result["per_sample"]["strict"]):
            row.update(chosen_letter=letter, correct_strict=ok, condition=mode, bare_question=bare[row["index"]])
        rows[f"closed_{mode}"] = answered
        strict[mode] = result["strict"]

    real = rows["closed_real"]
    truth = {(r["image_path"], r["bare_question"]): r["answer"] for r in real}
    # The donor's own answers: every chosen image was asked the same kinds of question.
    swapped_follow = follows_swapped([{**r, "question": r["bare_question"]} for r in rows["closed_swapped"]], truth)
    train_rows = question_rows(read_vqa_csv(vqa_dir / "M3D_VQA_train.csv"))
    test_rows = question_rows(closed.rows.iloc[keep])
    baseline = text_prior_baseline(train_rows, test_rows)

    yn = VQADataset(vqa_dir / "M3D_VQA_yn_test.csv", mode="open", size=size)  # type: ignore[arg-type]
    yn_keep = [i for i, p in enumerate(yn.rows["Image Path"].astype(str)) if p in chosen]
    yn_rows = generate_answers(model, Subset(yn, yn_keep), GenerationSettings(max_new_tokens=4, batch_size=batch_size),
                               progress=progress)
    rows["yes_no"] = yn_rows

    reports = CaptionDataset(root / "M3D_Cap.json", split="test", size=size, train=False, seed=seed)  # type: ignore[arg-type]
    reported = set(images[:n_reports] if n_reports is not None else images)
    rep_keep = [i for i, item in enumerate(reports.items) if item["image"] in reported]
    report_rows = generate_answers(model, Subset(reports, rep_keep), GenerationSettings(max_new_tokens=96, batch_size=batch_size),
                                   caption=True, progress=progress)
    cases = _cases_by_image(root)
    for row in report_rows:
        case, plane = cases[row["image_path"]]
        row.update(score_report(row["prediction"], case, plane))
    rows["report"] = report_rows

    def by_type(summary: dict[str, Any]) -> dict[str, float]:
        return {QUESTION_TYPE_NAMES[int(t)]: round(100 * s["mean"], 2) for t, s in summary["by_type"].items()}

    results = {
        "closed_vqa": {
            "n": len(real),
            "images": len(images),
            "empty": sum(not r["prediction"].strip() for r in real),
            "majority_baseline": baseline["accuracy"],
            "chance": round(100 * sum(1 / max(1, sum(v != "NA" for v in r["choices"].values())) for r in real) / len(real), 2),
            "strict": {"overall": round(100 * strict["real"]["overall"]["mean"], 2), "by_type": by_type(strict["real"])},
        },
        "yes_no": yes_no_metrics([r["prediction"] for r in yn_rows], [r["answer"] for r in yn_rows]),
        "report": findings_summary(report_rows),
        "ablation": {
            "zero": {"closed_vqa_strict": round(100 * strict["zero"]["overall"]["mean"], 2), "by_type": by_type(strict["zero"])},
            "swapped": {"closed_vqa_strict": round(100 * strict["swapped"]["overall"]["mean"], 2), "by_type": by_type(strict["swapped"]),
                        "follows_swapped": swapped_follow["follows_swapped"], "follows_swapped_n": swapped_follow["n"]},
        },
    }
    return results, rows


def _cases_by_image(root: Path) -> dict[str, tuple[dict[str, Any], str]]:
    truth = json.loads((root / "phantom_truth.json").read_text())
    return {s["image"]: (case, s["plane"]) for case in truth["cases"] for s in case["series"]}
