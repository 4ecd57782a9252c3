"""Rendering a generation evaluation: the paper's tables (2, 3 and 4 layouts), per-type plots and the output folder.

`med3dvlm.eval.generation` runs and scores; this module only turns its rows and summary into files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fileio import write_json_atomic
from ..metrics.nlg import METRIC_LABELS, PAPER_METRICS
from ..metrics.vqa import QUESTION_TYPE_NAMES

EXTRA_METRICS = ("bleu4_corpus", "rougeL")  # reported beyond the paper's four


def _pct(stat: Mapping[str, float], ci: bool = True) -> str:
    text = f"{100 * stat['mean']:.2f}"
    return f"{text} [{100 * stat['ci_low']:.1f}, {100 * stat['ci_high']:.1f}]" if ci else text


def report_table(summary: Mapping[str, Any], name: str = "model") -> str:
    """Table 2 layout (BLEU, ROUGE, METEOR, BERTScore, %), then our additions, each with a 95% CI."""
    m = summary["metrics"]
    paper = [k for k in PAPER_METRICS if k in m]
    extra = [k for k in EXTRA_METRICS if k in m]
    lines = [
        "| Method | " + " | ".join(METRIC_LABELS[k] for k in paper) + " |",
        "|---|" + "---:|" * len(paper),
        f"| {name} | " + " | ".join(_pct(m[k], ci=False) for k in paper) + " |",
        "",
        "With 95% bootstrap intervals, and metrics the paper lacks:",
        "",
        "| Method | " + " | ".join(METRIC_LABELS[k] for k in paper + extra) + " |",
        "|---|" + "---:|" * len(paper + extra),
        f"| {name} | " + " | ".join(_pct(m[k]) for k in paper + extra) + " |",
    ]
    return "\n".join(lines)


def closed_vqa_table(closed: Mapping[str, Any], name: str = "model") -> str:
    """Table 3 layout: accuracy (%) per question type, mean over types, then overall with its CI."""
    types = sorted({int(t) for rule in closed.values() for t in rule["by_type"]})
    head = [QUESTION_TYPE_NAMES.get(t, str(t)) for t in types]
    lines = [
        "| Method | scoring | " + " | ".join(head) + " | Mean | Overall [95% CI] |",
        "|---|---|" + "---:|" * (len(head) + 2),
    ]
    for rule, label in (("loose", "original (substring)"), ("strict", "strict (chosen letter)")):
        if rule not in closed:
            continue
        r = closed[rule]
        cells = [_pct(r["by_type"][t], ci=False) if t in r["by_type"] else "-" for t in types]
        lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {100 * r['mean_over_types']:.2f} | {_pct(r['overall'])} |")
    return "\n".join(lines)


def open_vqa_table(open_: Mapping[str, Any], name: str = "model") -> str:
    """Table 4 layout: one row per question type with BLEU, ROUGE, METEOR, BERTScore (%), then all questions."""
    metrics = [k for k in PAPER_METRICS + EXTRA_METRICS if k in open_["overall"]]
    lines = [
        "| Method | Question type | " + " | ".join(METRIC_LABELS[k] for k in metrics) + " |",
        "|---|---|" + "---:|" * len(metrics),
    ]
    for t, stats in open_["by_type"].items():
        label = QUESTION_TYPE_NAMES.get(int(t), str(t))
        lines.append(f"| {name} | {label} | " + " | ".join(_pct(stats[k], ci=False) for k in metrics) + " |")
    lines.append(f"| {name} | all (95% CI) | " + " | ".join(_pct(open_["overall"][k]) for k in metrics) + " |")
    return "\n".join(lines)


def settings_block(summary: Mapping[str, Any]) -> str:
    gen = summary.get("generation_effective", {})
    text = ", ".join(f"{k}={v}" for k, v in gen.items())
    extra = summary.get("metric_settings", {})
    bert = extra.get("bertscore_model")
    return f"Generation: {text}.  \nBERTScore model: {bert if bert else 'not computed'}."


def plot_by_type(groups: Mapping[str, Mapping[Any, float]], path: str | os.PathLike, title: str, ylabel: str) -> Path:
    """Grouped bars: one group per question type, one bar per series ({series: {type: value in [0, 1]}})."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    types = sorted({int(t) for series in groups.values() for t in series})
    x = np.arange(len(types))
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(types) + 2), 4))
    for i, (label, series) in enumerate(groups.items()):
        ax.bar(x + i * width - 0.4 + width / 2, [100 * series.get(t, float("nan")) for t in types], width, label=label)
    ax.set_xticks(x, [QUESTION_TYPE_NAMES.get(t, str(t)) for t in types])
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(rows: Sequence[Mapping[str, Any]], summary: dict[str, Any], out_dir: str | os.PathLike, name: str = "model") -> dict[str, str]:
    """Write predictions.csv, summary.json, tables.md and the per-type plots; returns their paths."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"predictions": out / "predictions.csv", "summary": out / "summary.json", "tables": out / "tables.md"}
    frame = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows])
    frame.to_csv(paths["predictions"], index=False)
    sections = [f"# {summary['task']} evaluation: {name}\n", settings_block(summary), ""]
    if summary["task"] == "report":
        sections += [f"## Report generation (Table 2 layout), {summary['data']['samples']} reports, %\n", report_table(summary, name), ""]
    if "closed" in summary:
        sections += [f"## Closed-ended VQA accuracy (Table 3 layout), {summary['samples']['closed']} questions, %\n",
                     closed_vqa_table(summary["closed"], name), ""]
        paths["closed_plot"] = plot_by_type(
            {rule: {t: s["mean"] for t, s in summary["closed"][rule]["by_type"].items()} for rule in ("loose", "strict")},
            out / "closed_vqa_by_type.png", "Closed-ended VQA accuracy", "accuracy (%)",
        )
    if "open" in summary:
        sections += [f"## Open-ended VQA (Table 4 layout), {summary['samples']['open']} questions, %\n",
                     open_vqa_table(summary["open"], name), ""]
        metrics = [k for k in PAPER_METRICS if k in summary["open"]["overall"]]
        paths["open_plot"] = plot_by_type(
            {METRIC_LABELS[k]: {t: s[k]["mean"] for t, s in summary["open"]["by_type"].items()} for k in metrics},
            out / "open_vqa_by_type.png", "Open-ended VQA", "score (%)",
        )
    paths["tables"].write_text("\n".join(sections))
    summary = {**summary, "files": {k: str(v) for k, v in paths.items()}}
    write_json_atomic(paths["summary"], summary, default=str)
    return {k: str(v) for k, v in paths.items()}
