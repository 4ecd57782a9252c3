"""Evaluation: image-text retrieval (`retrieval`); report generation and VQA metrics join this package."""
