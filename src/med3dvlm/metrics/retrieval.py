"""Image-text retrieval recall@k with the Med3DVLM protocol.

Xin et al., IEEE JBHI 2025 (https://ieeexplore.ieee.org/document/11145341), evaluation script
`src/eval/eval_clip.py` of the original code: embed N image-report pairs, S = cosine similarity matrix
(images x texts, no temperature), recall@k = the share of rows whose own pair (the diagonal entry) is among
the row's k largest entries. IR@k is computed on S (each image ranks the texts) and TR@k on S^T (each text
ranks the images), for k in (1, 5, 10), on the first N test pairs for N in (100, 500, 1000, 2000).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F


def recall_at_k(similarity: torch.Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Share of rows i whose entry (i, i) is in the row's top k, for each k.

    The rank of the true match is the number of entries strictly larger than it, so ties go to the true
    match (identical to `topk` membership whenever there are no ties). A k larger than the number of
    columns counts every row as a hit.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"need a square (N, N) similarity matrix of paired items, got {tuple(similarity.shape)}")
    sim = similarity.detach().float()
    positives = sim.diagonal().unsqueeze(1)
    rank = (sim > positives).sum(dim=1)  # 0 = the true match is first
    out = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out[int(k)] = (rank < k).float().mean().item()
    return out


def retrieval_metrics(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """{"IR@k": ..., "TR@k": ...} for paired (N, E) embeddings (row i of each is one pair).

    IR@k ranks texts for each image (rows of S), TR@k ranks images for each text (rows of S^T), as the
    original evaluation. Embeddings are L2-normalized here, so S is the cosine similarity.
    """
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.dim() != 2:
        raise ValueError(
            f"need paired (N, E) embeddings, got {tuple(image_embeddings.shape)} and {tuple(text_embeddings.shape)}"
        )
    img = F.normalize(image_embeddings.detach().float(), dim=-1)
    txt = F.normalize(text_embeddings.detach().float(), dim=-1)
    sim = img @ txt.T
    ir, tr = recall_at_k(sim, ks), recall_at_k(sim.T, ks)
    return {**{f"IR@{k}": v for k, v in ir.items()}, **{f"TR@{k}": v for k, v in tr.items()}}


def retrieval_metrics_by_size(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    sizes: Sequence[int] = (100, 500, 1000, 2000),
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, dict[str, float]]:
    """`retrieval_metrics` on the first N pairs for each N (nested prefixes, as the original evaluation).

    Sizes larger than the number of pairs are skipped.
    """
    total = image_embeddings.shape[0]
    return {
        n: retrieval_metrics(image_embeddings[:n], text_embeddings[:n], ks) for n in sizes if n <= total
    }
