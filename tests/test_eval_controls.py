"""The evaluation controls: report findings against ground truth, image ablations, baselines, yes/no, probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from med3dvlm.data.phantom import sample_case
from med3dvlm.data.phantom_text import report_text
from med3dvlm.eval.findings import findings_summary, read_report, score_report
from med3dvlm.eval.grounding import ImageAblation, follows_swapped, swap_partners, text_prior_baseline, yes_no_metrics
from med3dvlm.eval.probe import probe_by_type


def _cases(n: int = 60) -> list[dict]:
    cases = []
    for i in range(n):
        case = sample_case(i, seed=5)
        case["report"] = report_text(case)
        cases.append(case)
    return cases


def test_true_reports_state_every_finding_and_nothing_false():
    scores = [score_report(c["report"], c, c["series"][0]["plane"]) for c in _cases()]
    summary = findings_summary(scores)
    assert summary["finding_accuracy"] == 100.0 and summary["hallucination_rate"] == 0.0
    assert set(summary["by_finding"]) == {"plane", "phase", "organ", "kind", "side", "lesion"}


def test_wrong_plane_phase_and_invented_lesion_are_caught():
    case = next(c for c in _cases() if c["lesions"] and c["series"][0]["plane"] == "axial" and c["phase"] != "delayed")
    lesion = case["lesions"][0]
    other_organ = "spleen" if lesion["organ"] != "spleen" else "liver"
    text = (f"Coronal delayed phase CT of the {case['region']}. A 2.0 cm cyst is seen in the upper pole of the {other_organ}.")
    scored = score_report(text, case, "axial")
    assert scored["correct"]["plane"] is False and scored["correct"]["phase"] is False
    assert scored["correct"]["organ"] is False and scored["false_lesions"] == 1
    assert read_report(text).planes == {"coronal"}


def test_no_lesion_is_a_finding_of_its_own():
    case = next(c for c in _cases() if not c["lesions"])
    plane = case["series"][0]["plane"]
    assert score_report(case["report"], case, plane)["correct"]["lesion"] is True
    invented = case["report"].replace("No focal lesion is identified.", "There is a 3.0 cm mass in the right lobe of the liver.")
    assert score_report(invented, case, plane)["correct"]["lesion"] is False


def test_swap_partners_come_from_other_cases_and_repeat_for_a_seed():
    paths = [f"npy/p/{c:03d}/{s}.npy" for c in range(6) for s in ("Axial", "Coronal")]
    donors = swap_partners(paths, seed=1)
    assert set(donors) == set(paths)
    assert all(d.split("/")[2] != p.split("/")[2] for p, d in donors.items())
    assert donors == swap_partners(paths, seed=1) and donors != swap_partners(paths, seed=2)
    with pytest.raises(ValueError, match="two cases"):
        swap_partners(["npy/p/000/Axial.npy", "npy/p/000/Coronal.npy"])


def test_zero_ablation_zeroes_the_volume_only():
    item = {"image": torch.rand(1, 4, 4, 4), "question": "q", "answer": "a", "image_path": "x/0/a.npy"}
    zeroed = ImageAblation([item], "zero")[0]
    assert torch.equal(zeroed["image"], torch.zeros(1, 4, 4, 4)) and zeroed["question"] == "q"
    assert item["image"].abs().sum() > 0  # the wrapped dataset's item is left alone
    with pytest.raises(ValueError, match="donor"):
        ImageAblation([item], "swapped")


def _row(q: str, answer: str, letter: str, choices: dict, qtype: int = 1) -> dict:
    return {"question": q, "question_type": qtype, "answer": answer, "answer_choice": letter, "choices": choices}


def test_text_prior_baseline_takes_the_most_frequent_training_answer():
    abc = {"A": "Axial", "B": "Coronal", "C": "Sagittal", "D": "NA"}
    train = [_row("plane?", "Axial", "A", abc)] * 3 + [_row("plane?", "Coronal", "B", abc)]
    test = [_row("plane?", "Axial", "C", {"A": "Coronal", "B": "Sagittal", "C": "Axial", "D": "NA"}),
            _row("plane?", "Coronal", "A", {"A": "Coronal", "B": "Axial", "C": "Sagittal", "D": "NA"})]
    assert text_prior_baseline(train, test)["accuracy"] == 50.0


def test_follows_swapped_counts_answers_naming_the_donor_truth():
    choices = {"A": "Axial", "B": "Coronal", "C": "Sagittal", "D": "NA"}
    truth = {("d1", "plane?"): "Coronal", ("d2", "plane?"): "Axial"}
    rows = [{**_row("plane?", "Axial", "A", choices), "donor_path": "d1", "chosen_letter": "B"},  # follows the donor
            {**_row("plane?", "Axial", "A", choices), "donor_path": "d1", "chosen_letter": "A"},  # answers its own case
            {**_row("plane?", "Axial", "A", choices), "donor_path": "d2", "chosen_letter": "A"}]  # cannot tell: not counted
    assert follows_swapped(rows, truth) == {"follows_swapped": 50.0, "n": 2}


def test_yes_no_metrics_expose_a_model_that_always_says_no():
    answers = ["Yes", "No", "Yes", "No"]
    always_no = yes_no_metrics(["No", "No.", "no", "No"], answers)
    assert always_no["balanced_accuracy"] == 50.0 and always_no["yes_rate"] == 0.0 and always_no["true_yes_rate"] == 50.0
    perfect = yes_no_metrics(["Yes.", "No", "yes", "no"], answers)
    assert perfect["balanced_accuracy"] == 100.0 and perfect["yes_rate"] == 50.0
    assert yes_no_metrics(["", "maybe"], ["Yes", "No"])["unreadable"] == 2


def test_probe_reads_a_linearly_coded_answer_and_not_noise():
    rng = np.random.default_rng(0)
    labels = ["Axial", "Coronal", "Sagittal"]
    def rows(n: int, codes: np.ndarray) -> list[dict]:
        out = []
        for c in codes:
            order = rng.permutation(3)
            choices = {letter: labels[k] for letter, k in zip("ABC", order)}
            out.append(_row("plane?", labels[c], "ABC"[list(order).index(c)], choices))
        return out
    codes_tr, codes_te = rng.integers(3, size=300), rng.integers(3, size=90)
    feats_tr = np.eye(3)[codes_tr] + 0.1 * rng.standard_normal((300, 3))
    feats_te = np.eye(3)[codes_te] + 0.1 * rng.standard_normal((90, 3))
    coded = probe_by_type(feats_tr, rows(300, codes_tr), feats_te, rows(90, codes_te), c=1.0)
    assert coded[1]["accuracy"] == 100.0
    noise = probe_by_type(rng.standard_normal((300, 3)), rows(300, codes_tr), rng.standard_normal((90, 3)), rows(90, codes_te))
    assert noise[1]["accuracy"] < 60.0


def test_closed_questions_can_be_answered_with_the_choice_text(tmp_path):
    from med3dvlm.data.datasets import VQADataset
    from med3dvlm.data.phantom import write_phantom_dataset
    from med3dvlm.metrics.vqa import chosen_letter

    write_phantom_dataset(tmp_path, n=6, seed=0, size=(16, 32, 32), progress=False)
    csv = tmp_path / "M3D-VQA" / "M3D_VQA_train.csv"
    letter_first = VQADataset(csv, mode="closed")[0]
    text_only = VQADataset(csv, mode="closed", closed_answer="text")[0]
    assert letter_first["question"] == text_only["question"] and "Choices: A. " in text_only["question"]
    assert letter_first["answer"] == f"{text_only['answer_choice']}. {text_only['answer']}"
    assert chosen_letter(text_only["answer"], text_only["choices"]) == text_only["answer_choice"]
    with pytest.raises(ValueError, match="closed_answer"):
        VQADataset(csv, mode="closed", closed_answer="letters")
