"""The quickstart's results page: a markdown file with tables, plots, slice images and example predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _read(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else f"_missing: {path}_"


def _strip_title(markdown: str) -> str:
    """Drop a table file's own top-level title so it nests under our headings."""
    return "\n".join(line for line in markdown.splitlines() if not line.startswith("# "))


def loss_plot(out: Path) -> Path | None:
    """Training loss of the three stages side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [("stage 1 (SigLIP)", out / "stage1"), ("stage 2 (projector)", out / "stage2"), ("stage 3 (LoRA)", out / "stage3")]
    curves = []
    for title, folder in stages:
        path = folder / "metrics.jsonl"
        if path.is_file():
            points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            points = [(p["step"], p["train/loss"]) for p in points if "train/loss" in p]
            if points:
                curves.append((title, points))
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
    for ax, (title, points) in zip(axes[0], curves):
        ax.plot(*zip(*points), marker=".")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "training_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def slice_images(out: Path, n: int = 3) -> list[tuple[Path, str]]:
    """Mid axial/coronal/sagittal slices of the first test volumes, with their reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.m3d import read_cap_json, resolve_in_root
    from .data.prepare import from_storage

    data = out / "data"
    test = read_cap_json(data / "M3D_Cap.json").get("test", [])[:n]
    shown = []
    for i, item in enumerate(test):
        volume = from_storage(np.load(resolve_in_root(data, item["image"])))
        d, h, w = (s // 2 for s in volume.shape)
        fig, axes = plt.subplots(1, 3, figsize=(9, 3))
        for ax, (name, image) in zip(axes, [("axial", volume[d]), ("coronal", volume[:, h]), ("sagittal", volume[:, :, w])]):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, aspect="auto")
            ax.set_title(name)
            ax.axis("off")
        fig.tight_layout()
        path = out / f"case_{i}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        shown.append((path, resolve_in_root(data, item["text"]).read_text().strip()))
    return shown


def example_predictions(out: Path, n: int = 4) -> str:
    import pandas as pd

    def cell(value: object) -> str:
        text = "" if pd.isna(value) else str(value)
        return text.replace("|", "/").strip() or "_(empty)_"

    parts = []
    report = out / "eval" / "report.csv"
    if report.is_file():
        frame = pd.read_csv(report, keep_default_na=False).head(n)
        parts.append("| reference report | generated report |\n|---|---|")
        parts += [f"| {cell(r.answer)} | {cell(r.prediction)} |" for r in frame.itertuples()]
    for name, title in (("closed_real", "closed-ended VQA"), ("yes_no", "yes/no")):
        path = out / "eval" / f"{name}.csv"
        if path.is_file():
            rows = pd.read_csv(path, keep_default_na=False).head(2 * n)
            parts.append(f"\n{title}:\n\n| question | answer | model |\n|---|---|---|")
            parts += [f"| {cell(r.question)} | {cell(r.answer)} | {cell(r.prediction)} |" for r in rows.itertuples()]
    return "\n".join(parts) if parts else "_no predictions_"


def controls_section(results: dict) -> list[str]:
    """The held-out numbers beside their controls: text-prior baseline, zeroed and swapped volumes, probe."""
    closed, ablation, probe = results["closed_vqa"], results["ablation"], results.get("probe", {}).get("by_type", {})
    types = list(closed["strict"]["by_type"])
    row = lambda name, values: f"| {name} | " + " | ".join(f"{values.get(t, float('nan')):.1f}" for t in types) + " |"  # noqa: E731
    yn, rep, ret = results["yes_no"], results["report"], results["retrieval"]
    return [
        "## Does the model read the scan?",
        "",
        f"Held-out cases only. Closed VQA: {closed['n']} questions on {closed['images']} images, strict letter scoring; "
        f"chance {closed['chance']:.1f} %, image-free text-prior baseline {closed['majority_baseline']:.1f} % "
        "(the training set's most frequent answer to the same question among the offered choices).",
        "",
        f"| closed VQA, % | " + " | ".join(types) + " |",
        "|---|" + "---:|" * len(types),
        row(f"real volumes (overall {closed['strict']['overall']:.1f})", closed["strict"]["by_type"]),
        row(f"zeroed volumes (overall {ablation['zero']['closed_vqa_strict']:.1f})", ablation["zero"]["by_type"]),
        row(f"volumes swapped between cases (overall {ablation['swapped']['closed_vqa_strict']:.1f})", ablation["swapped"]["by_type"]),
        row("linear probe on the frozen stage-1 features (ceiling)", probe),
        "",
        f"Under the swap, {ablation['swapped']['follows_swapped']} % of the answers that could tell name the swapped-in "
        f"volume's answer (n = {ablation['swapped']['follows_swapped_n']}). Empty closed answers: {closed['empty']}.",
        "",
        f"Yes/no ({yn['n']} questions): balanced accuracy {yn['balanced_accuracy']} %, yes-rate {yn['yes_rate']} % "
        f"(true {yn['true_yes_rate']} %). Reports ({rep['n']}): {rep['finding_accuracy']} % of {rep['findings']} findings "
        f"stated correctly ({rep['by_finding']}); {rep['hallucination_rate']} % of the {rep['stated_lesions']} stated lesions "
        "are not in the case. "
        f"Retrieval on {ret['n']} held-out pairs with distinct reports: IR@1 {ret['ir_at_1']} %, TR@1 {ret['tr_at_1']} % "
        f"(chance {ret['chance']} %).",
        "",
    ]


def write_results_page(out: str | Path, results: dict | None = None) -> Path:
    out = Path(out)
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    lines = [
        "# med3dvlm quickstart results",
        "",
        "Phantom CT data, a narrow DCFormer + MiniLM (stage 1), SmolLM2-135M-Instruct with a 2xMLP-Mixer-H projector "
        "(stages 2 and 3, LoRA merged), all on CPU. Toy sizes: the numbers show the pipeline works end to end, "
        "not the paper's accuracy.",
        "",
        "## Time per step (seconds, this run)",
        "",
        "| step | seconds |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in timings.items()],
        "",
    ]
    if results:
        lines += controls_section(results)
    loss = loss_plot(out)
    if loss:
        lines += ["## Training", "", f"![training loss]({loss.name})", ""]
    lines += ["## Retrieval (stage 1)", "", _strip_title(_read(out / "stage1" / "eval" / "retrieval.md")), ""]
    if (out / "stage1" / "eval" / "recall_at_k.png").is_file():
        lines += ["![recall at K](stage1/eval/recall_at_k.png)", ""]
    lines += ["## Example predictions", "", example_predictions(out), "", "## Test volumes", ""]
    for path, report in slice_images(out):
        lines += [f"![{path.stem}]({path.name})", "", f"> {report}", ""]
    page = out / "results.md"
    page.write_text("\n".join(lines) + "\n")
    return page
