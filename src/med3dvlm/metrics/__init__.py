"""Evaluation metrics as pure functions (no model, no I/O)."""

from .retrieval import recall_at_k, retrieval_metrics, retrieval_metrics_by_size
from .nlg import bootstrap_ci, corpus_bleu4, nlg_metrics, nlg_per_sample
from .vqa import chosen_letter, closed_vqa_metrics, loose_correct, open_vqa_by_type, strict_correct

__all__ = ["recall_at_k", "retrieval_metrics", "retrieval_metrics_by_size"]
__all__ += ["bootstrap_ci", "corpus_bleu4", "nlg_metrics", "nlg_per_sample"]
__all__ += ["chosen_letter", "closed_vqa_metrics", "loose_correct", "open_vqa_by_type", "strict_correct"]
