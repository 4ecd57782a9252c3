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
    report = out / "eval" / "report" / "predictions.csv"
    if report.is_file():
        frame = pd.read_csv(report, keep_default_na=False).head(n)
        parts.append("| reference report | generated report |\n|---|---|")
        parts += [f"| {cell(r.answer)} | {cell(r.prediction)} |" for r in frame.itertuples()]
    vqa = out / "eval" / "vqa" / "predictions.csv"
    if vqa.is_file():
        frame = pd.read_csv(vqa, keep_default_na=False)
        for mode in ("closed", "open"):
            rows = frame[frame["mode"] == mode].head(n)
            if len(rows):
                parts.append(f"\n{mode}-ended VQA:\n\n| question | answer | model |\n|---|---|---|")
                parts += [f"| {cell(r.question)} | {cell(r.answer)} | {cell(r.prediction)} |" for r in rows.itertuples()]
    return "\n".join(parts) if parts else "_no predictions_"


def write_results_page(out: str | Path) -> Path:
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
    loss = loss_plot(out)
    if loss:
        lines += ["## Training", "", f"![training loss]({loss.name})", ""]
    lines += ["## Retrieval (stage 1)", "", _strip_title(_read(out / "stage1" / "eval" / "retrieval.md")), ""]
    if (out / "stage1" / "eval" / "recall_at_k.png").is_file():
        lines += ["![recall at K](stage1/eval/recall_at_k.png)", ""]
    lines += ["## Report generation and VQA", "", _strip_title(_read(out / "eval" / "report" / "tables.md")), "",
              _strip_title(_read(out / "eval" / "vqa" / "tables.md")), ""]
    for plot in ("closed_vqa_by_type.png", "open_vqa_by_type.png"):
        if (out / "eval" / "vqa" / plot).is_file():
            lines += [f"![{plot}](eval/vqa/{plot})", ""]
    lines += ["## Example predictions", "", example_predictions(out), "", "## Test volumes", ""]
    for path, report in slice_images(out):
        lines += [f"![{path.stem}]({path.name})", "", f"> {report}", ""]
    page = out / "results.md"
    page.write_text("\n".join(lines) + "\n")
    return page
