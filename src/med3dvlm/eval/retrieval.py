"""Image-text retrieval evaluation of a contrastive model with the Med3DVLM protocol.

Protocol (reference-facts §2, the original `src/eval/eval_clip.py`): embed the pairs of a split, S =
cosine similarity (images x texts, no temperature), IR@k on S (each image ranks the reports), TR@k on
S^T (each report ranks the images), k in (1, 5, 10), on the *first N* pairs of the split for N in
(100, 500, 1000, 2000) (nested prefixes, not random draws). Reports are truncated deterministically
(first sentence, then the others in order, within the token budget). The metrics themselves are the
pure functions of `med3dvlm.metrics.retrieval`.

Run it on the published split (the paper's numbers; it leaks cases between train and test) and on a
case-level split (`med3dvlm data split`) to see how much of the score the leakage explains.
Outputs: ``retrieval.json``, ``retrieval.md`` (one table per split) and ``recall_at_k.png``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..fileio import write_json_atomic
from ..metrics.retrieval import retrieval_metrics_by_size

logger = logging.getLogger(__name__)

PAPER_SIZES = (100, 500, 1000, 2000)
KS = (1, 5, 10)


@torch.no_grad()
def embed_pairs(
    model: nn.Module,
    tokenizer: Any,
    dataset: Any,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) image and (N, E) text embeddings (unit norm, float32, CPU) of a dataset of image-report pairs.

    The dataset yields {"image": (1, D, H, W), "text": str} items, like `ImageReportDataset`.
    """
    from tqdm.auto import tqdm

    from ..data.collate import ImageTextCollate

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = ImageTextCollate(tokenizer, model.text_length)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    images, texts = [], []
    for batch in tqdm(loader, desc="embed pairs", unit="batch", disable=not progress):
        images.append(model.encode_image(batch["images"].to(device)).float().cpu())
        texts.append(model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def evaluate_retrieval(
    model: nn.Module,
    tokenizer: Any,
    cap_json: str | os.PathLike,
    split: str = "test",
    sizes: Sequence[int] = PAPER_SIZES,
    ks: Sequence[int] = KS,
    root: str | os.PathLike | None = None,
    image_size: Sequence[int] | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Recall@k on the first N pairs of `split` of an M3D_Cap.json, for each N in `sizes` that fits.

    When no size fits (a small split), all pairs are used, so there is always one result.
    Returns {"cap_json", "split", "pairs", "by_size": {N: {"IR@1": .., "TR@1": .., ...}}, "chance": {N: {k: k/N}}}.
    """
    from ..data.collate import TokenCounter
    from ..data.datasets import ImageReportDataset

    size = tuple(image_size) if image_size is not None else tuple(model.config.input_size)
    largest = max(sizes) if sizes else 0
    dataset = ImageReportDataset(
        cap_json, split=split, root=root, size=size, train=False,  # type: ignore[arg-type]
        max_tokens=model.text_length, count_tokens=TokenCounter(tokenizer),
    )
    total = len(dataset)
    if total == 0:
        raise ValueError(f"{cap_json}: split {split!r} is empty")
    fitting = [n for n in sizes if n <= total]
    if not fitting:
        logger.warning("%s: split %r has %d pairs, fewer than every size in %s; using all %d", cap_json, split, total, list(sizes), total)
        fitting = [total]
    # Only the prefix that the largest size needs is embedded (the protocol never looks further).
    needed = max(fitting)
    if needed < total:
        from torch.utils.data import Subset

        dataset = Subset(dataset, range(needed))
    logger.info("retrieval: %d of %d pairs of %s[%s], sizes %s (largest asked %d)", needed, total, cap_json, split, fitting, largest)
    img, txt = embed_pairs(model, tokenizer, dataset, batch_size=batch_size, num_workers=num_workers, progress=progress)
    by_size = retrieval_metrics_by_size(img, txt, sizes=fitting, ks=ks)
    return {
        "cap_json": str(cap_json),
        "split": split,
        "pairs": total,
        "image_size": list(size),
        "by_size": {int(n): m for n, m in by_size.items()},
        "chance": {int(n): {int(k): min(1.0, k / n) for k in ks} for n in fitting},
    }


def evaluate_checkpoint(
    model_dir: str | os.PathLike,
    datasets: Mapping[str, str | os.PathLike],
    split: str = "test",
    sizes: Sequence[int] = PAPER_SIZES,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Load a saved Contrastive3D (with its tokenizer) and evaluate it on each named M3D_Cap.json."""
    from ..loading import load_contrastive

    model, tokenizer = load_contrastive(model_dir, device, require_tokenizer=True)
    return {
        name: evaluate_retrieval(model, tokenizer, path, split=split, sizes=sizes, batch_size=batch_size, num_workers=num_workers)
        for name, path in datasets.items()
    }


def markdown_table(results: Mapping[str, Mapping[str, Any]], ks: Sequence[int] = KS) -> str:
    """One table per evaluated split: rows N, columns IR@k and TR@k in percent, chance R@1 last."""
    lines = []
    for name, res in results.items():
        lines.append(f"### {name}: `{res['cap_json']}` [{res['split']}], {res['pairs']} pairs\n")
        head = [f"IR@{k}" for k in ks] + [f"TR@{k}" for k in ks]
        lines.append("| N | " + " | ".join(head) + " | chance R@1 |")
        lines.append("|---:|" + "---:|" * len(head) + "---:|")
        for n, metrics in res["by_size"].items():
            cells = [f"{100 * metrics[h]:.1f}" for h in head]
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {100 / int(n):.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot_recall(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, ks: Sequence[int] = KS) -> Path:
    """Recall@K curves: one panel per direction (IR, TR), one line per (split, N), chance dotted."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, direction, title in zip(axes, ("IR", "TR"), ("image -> text", "text -> image")):
        for name, res in results.items():
            for n, metrics in res["by_size"].items():
                ax.plot(ks, [100 * metrics[f"{direction}@{k}"] for k in ks], marker="o", label=f"{name}, N={n}")
                ax.plot(ks, [100 * min(1.0, k / int(n)) for k in ks], linestyle=":", color="grey", linewidth=1)
        ax.set_title(f"{title} ({direction}@K)")
        ax.set_xlabel("K")
        ax.set_xticks(list(ks))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    axes[0].set_ylim(0, 100)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_retrieval_report(results: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write retrieval.json, retrieval.md and recall_at_k.png into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "retrieval.json", "markdown": out / "retrieval.md", "plot": out / "recall_at_k.png"}
    write_json_atomic(paths["json"], results)
    paths["markdown"].write_text("# Image-text retrieval (recall@K, %)\n\n" + markdown_table(results))
    plot_recall(results, paths["plot"])
    return {k: str(v) for k, v in paths.items()}
