"""Recall@k on hand-computed cases, and against a naive topk reference (the original evaluation's method)."""

from __future__ import annotations

import pytest
import torch

from med3dvlm.metrics import recall_at_k, retrieval_metrics, retrieval_metrics_by_size


def naive_recall(sim: torch.Tensor, k: int) -> float:
    """The original protocol: row i is a hit when index i is in topk(row i)."""
    hits = [i in sim[i].topk(min(k, sim.shape[1])).indices.tolist() for i in range(sim.shape[0])]
    return sum(hits) / len(hits)


def test_hand_computed_case() -> None:
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # true match first
            [0.8, 0.2, 0.5],  # true match third
            [0.1, 0.7, 0.3],  # true match second
        ]
    )
    assert recall_at_k(sim, ks=(1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    # Columns: col 0 has 0.9 first; col 1 has 0.2 second (after 0.7); col 2 has 0.3 second (after 0.5).
    assert recall_at_k(sim.T, ks=(1, 2)) == pytest.approx({1: 1 / 3, 2: 1.0})


@pytest.mark.parametrize("n", [7, 50])
def test_matches_topk_reference_and_directions(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    img = torch.randn(n, 16, generator=g)
    txt = img + 1.2 * torch.randn(n, 16, generator=g)
    metrics = retrieval_metrics(img, txt)
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    for k in (1, 5, 10):
        assert metrics[f"IR@{k}"] == pytest.approx(naive_recall(sim, k))
        assert metrics[f"TR@{k}"] == pytest.approx(naive_recall(sim.T, k))
    # The two directions genuinely differ on asymmetric data, and are ordered by k.
    assert metrics["IR@1"] <= metrics["IR@5"] <= metrics["IR@10"]
    assert retrieval_metrics(txt, img)["IR@1"] == metrics["TR@1"]


def test_perfect_and_scale_invariant() -> None:
    x = torch.eye(20)
    assert retrieval_metrics(x, 3.0 * x) == {f"{d}@{k}": 1.0 for d in ("IR", "TR") for k in (1, 5, 10)}


def test_by_size_uses_prefixes_and_skips_large_sizes() -> None:
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(120, 8, generator=g), torch.randn(120, 8, generator=g)
    out = retrieval_metrics_by_size(img, txt, sizes=(10, 100, 500))
    assert list(out) == [10, 100]
    assert out[10] == retrieval_metrics(img[:10], txt[:10])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        recall_at_k(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(3, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError):
        recall_at_k(torch.zeros(3, 3), ks=(0,))
