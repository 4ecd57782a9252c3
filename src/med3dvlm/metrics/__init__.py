"""Evaluation metrics as pure functions (no model, no I/O)."""

from .retrieval import recall_at_k, retrieval_metrics, retrieval_metrics_by_size

__all__ = ["recall_at_k", "retrieval_metrics", "retrieval_metrics_by_size"]
