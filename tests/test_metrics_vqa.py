"""VQA scoring: the original's loose substring rule, the strict chosen-letter rule, per-type aggregation."""

from __future__ import annotations

import math

import pytest

from med3dvlm.metrics import vqa

CHOICES = {"A": "axial", "B": "coronal", "C": "sagittal", "D": "NA"}


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("B. coronal", "B"),
        ("B", "B"),
        ("(C)", "C"),
        ("C) sagittal", "C"),
        ("The answer is D.", "D"),
        ("Answer: A", "A"),
        ("coronal", "B"),  # the choice text alone
        ("Sagittal plane.", "C"),  # one choice text inside the answer
        ("A lesion in the liver", None),  # the article, not a letter
        ("answer is a lesion", None),
        ("axial and coronal", None),  # two choice texts: no commitment
        ("", None),
        ("A. B. C. D.", "A"),  # the first letter it commits to
    ],
)
def test_chosen_letter(prediction, letter):
    assert vqa.chosen_letter(prediction, CHOICES) == letter


def test_loose_and_strict_disagree_where_expected():
    # The original's rule credits a listing of every letter and a letter mentioned in passing.
    assert vqa.loose_correct("A. B. C. D.", "C") and not vqa.strict_correct("A. B. C. D.", "C", CHOICES)
    assert vqa.loose_correct("A. axial, not B. coronal", "B") and not vqa.strict_correct("A. axial, not B. coronal", "B", CHOICES)
    # ... and misses a right answer given without "X.".
    assert not vqa.loose_correct("coronal", "B") and vqa.strict_correct("coronal", "B", CHOICES)
    assert vqa.loose_correct("B. coronal", "B") and vqa.strict_correct("B. coronal", "B", CHOICES)


def test_closed_metrics_per_type_and_means():
    preds = ["A. axial", "B. x", "C. y", "A. B.", "D. z", "B"]
    answers = ["A", "A", "C", "B", "D", "B"]
    types = [1, 1, 2, 2, 3, 3]
    out = vqa.closed_vqa_metrics(preds, answers, types, [CHOICES] * 6, n_resamples=100)
    assert out["per_sample"]["loose"] == [1, 0, 1, 1, 1, 0]
    assert out["per_sample"]["strict"] == [1, 0, 1, 0, 1, 1]
    assert out["per_sample"]["chosen"] == ["A", "B", "C", "A", "D", "B"]
    loose = out["loose"]
    assert {t: g["mean"] for t, g in loose["by_type"].items()} == {1: 0.5, 2: 1.0, 3: 0.5}
    assert loose["mean_over_types"] == pytest.approx(2 / 3)
    assert loose["overall"]["mean"] == pytest.approx(4 / 6) and loose["overall"]["n"] == 6
    strict = out["strict"]
    assert {t: g["mean"] for t, g in strict["by_type"].items()} == {1: 0.5, 2: 0.5, 3: 1.0}
    assert strict["overall"]["ci_low"] <= strict["overall"]["mean"] <= strict["overall"]["ci_high"]


def test_mean_over_types_is_macro_not_micro():
    preds = ["A."] * 3 + ["B."]
    out = vqa.closed_vqa_metrics(preds, ["A", "A", "A", "A"], [1, 1, 1, 2], n_resamples=10)
    assert out["loose"]["mean_over_types"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert out["loose"]["overall"]["mean"] == pytest.approx(0.75)


def test_open_vqa_by_type_groups_each_metric():
    scores = {"bleu1": [1.0, 0.0, 0.5, 0.25], "rouge1": [1.0, 1.0, 0.0, 0.0]}
    out = vqa.open_vqa_by_type(scores, [2, 1, 2, 1], n_resamples=20)
    assert list(out["by_type"]) == [1, 2]
    assert out["by_type"][1]["bleu1"]["mean"] == pytest.approx(0.125)
    assert out["by_type"][2]["rouge1"]["mean"] == pytest.approx(0.5)
    assert out["overall"]["bleu1"]["mean"] == pytest.approx(0.4375)
    with pytest.raises(ValueError, match="4 values but 3 question types"):
        vqa.by_type([1, 2, 3, 4], [1, 2, 3])


def test_empty_type_list_gives_nan_mean():
    out = vqa.closed_vqa_metrics([], [], [], n_resamples=10)
    assert math.isnan(out["loose"]["mean_over_types"]) and out["loose"]["by_type"] == {}
