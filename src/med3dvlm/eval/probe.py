"""A linear probe on frozen encoder features: how much of each closed question the image features hold.

For every question type, one multinomial logistic regression is fitted on the training questions, from the
encoder's tokens of the question's image (the last two stages, flattened: what the projector sees) to the
answer text. A test question is answered with the offered choice the probe finds most likely. Shown beside
the VLM's accuracy, it tells whether the encoder (probe low) or the language side (probe high, VLM low) limits
a question type.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


@torch.no_grad()
def encoder_features(encoder: torch.nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """(N, F) float32: the last two stages' tokens of each (1, D, H, W) image, flattened and concatenated."""
    encoder.eval()
    rows = []
    for start in range(0, len(images), batch_size):
        outputs = encoder(images[start:start + batch_size])
        rows.append(torch.cat([o.flatten(1) for o in outputs[-2:]], dim=1).float().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def probe_by_type(
    train_features: np.ndarray,
    train_rows: Sequence[Mapping[str, Any]],
    test_features: np.ndarray,
    test_rows: Sequence[Mapping[str, Any]],
    c: float = 0.05,
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """Accuracy (%) of a per-type linear probe on the test questions: {type: {"accuracy", "n"}}.

    Rows carry "question_type", "answer" (the answer text), "answer_choice" and "choices" ({letter: text});
    `*_features[i]` belongs to `*_rows[i]`.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features)
    xtr, xte = scaler.transform(train_features), scaler.transform(test_features)
    out: dict[int, dict[str, float]] = {}
    for qtype in sorted({int(r["question_type"]) for r in test_rows}):
        tr = [i for i, r in enumerate(train_rows) if int(r["question_type"]) == qtype]
        te = [i for i, r in enumerate(test_rows) if int(r["question_type"]) == qtype]
        labels = [str(train_rows[i]["answer"]) for i in tr]
        if len(set(labels)) < 2:
            continue
        clf = LogisticRegression(C=c, max_iter=300, random_state=seed).fit(xtr[tr], labels)
        known = {label: k for k, label in enumerate(clf.classes_)}
        proba = clf.predict_proba(xte[te])
        right = 0
        for p, i in zip(proba, te):
            row = test_rows[i]
            offered = {letter: text for letter, text in row["choices"].items() if text in known}
            if offered:
                letter = max(offered, key=lambda k: p[known[offered[k]]])
                right += letter == row["answer_choice"]
        out[qtype] = {"accuracy": round(100 * right / len(te), 2), "n": len(te)}
    return out
