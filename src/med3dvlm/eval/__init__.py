"""Evaluation: image-text retrieval (`retrieval`), report generation and VQA (`generation`, rendered by
`generation_report`), and the quickstart's controls (`controlled`, `grounding`, `findings`, `probe`)."""
