"""`med3dvlm eval report` and `med3dvlm eval vqa`: generation-based evaluation of a saved VLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .eval import eval_app
from .root import error_message, fail

_MODES = {"both": ("closed", "open"), "closed": ("closed",), "open": ("open",)}


def _settings(
    paper_sampling: bool, max_new_tokens: int, temperature: Optional[float], top_p: Optional[float],
    top_k: Optional[int], repetition_penalty: Optional[float], seed: int, batch_size: int,
) -> Any:
    from ..eval.generation import GenerationSettings

    common: dict[str, Any] = dict(max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k,
                                  repetition_penalty=repetition_penalty, seed=seed, batch_size=batch_size)
    if paper_sampling:
        return GenerationSettings.paper(**common, **({"temperature": temperature} if temperature is not None else {}))
    if temperature is not None:  # a temperature only means something when sampling
        return GenerationSettings(do_sample=True, temperature=temperature, **common)
    return GenerationSettings(**common)


def _bertscore_model(no_bertscore: bool, model: Optional[Path]) -> tuple[bool, Optional[str]]:
    return (not no_bertscore), (str(model) if model is not None else None)


# Options shared by both commands (Typer needs them spelled out per command).
_MODEL = typer.Option(..., "--model", "-m", help="A saved VLM folder (train output_dir/model, or a merged one) or a Hugging Face hub id (owner/name).")
_OUT = typer.Option(..., "--out", "-o", help="Folder for predictions.csv, summary.json, tables.md and plots.")
_PAPER = typer.Option(False, "--paper-sampling", help="Sample at temperature 1.0 like the original (default: greedy).")
_MAXTOK = typer.Option(256, "--max-new-tokens")
_TEMP = typer.Option(None, "--temperature", help="Sample at this temperature (implies sampling).")
_TOPP = typer.Option(None, "--top-p")
_TOPK = typer.Option(None, "--top-k")
_REP = typer.Option(None, "--repetition-penalty", help="Default: the LLM's generation_config.")
_SEED = typer.Option(42, "--seed", help="Seeds sampling and the per-item caption prompt choice.")
_BS = typer.Option(4, "--batch-size")
_NOBERT = typer.Option(False, "--no-bertscore", help="Skip BERTScore.")
_BERT = typer.Option(None, "--bertscore-model", help="Local model folder for BERTScore; default roberta-large (must be cached).")
_BOOT = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% intervals.")
_DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ...; default: cuda if available.")
_NAME = typer.Option(None, "--name", help="Row label in the tables; default: the model folder's name.")
_THREADS = typer.Option(
    None, "--threads", help="torch CPU threads; 1 is far faster for token-by-token decoding on a busy shared CPU."
)


def _run(kind: str, model: str, out: Path, name: Optional[str], device: Optional[str], threads: Optional[int], **kwargs: Any) -> None:
    from ..data.m3d import DatasetFormatError
    from ..eval.generation import evaluate_reports, evaluate_vqa, load_model, write_outputs

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        vlm = load_model(model, device)
        rows, summary = (evaluate_reports if kind == "report" else evaluate_vqa)(vlm, **kwargs)
    except (DatasetFormatError, FileNotFoundError, KeyError, TypeError, ValueError) as err:
        fail(error_message(err))
    summary["model"] = str(model)
    paths = write_outputs(rows, summary, out, name or Path(model).name)
    typer.echo(Path(paths["tables"]).read_text())
    typer.echo(json.dumps(paths, indent=2))


@eval_app.command()
def report(
    model: str = _MODEL,
    data: Path = typer.Option(..., "--data", "-d", help="M3D_Cap.json."),
    out: Path = _OUT,
    split: str = typer.Option("test", "--split"),
    limit: Optional[int] = typer.Option(1000, "--limit", "-n", help="First N reports (the paper: 1000); 0 = all."),
    paper_sampling: bool = _PAPER, max_new_tokens: int = _MAXTOK, temperature: Optional[float] = _TEMP,
    top_p: Optional[float] = _TOPP, top_k: Optional[int] = _TOPK, repetition_penalty: Optional[float] = _REP,
    seed: int = _SEED, batch_size: int = _BS, no_bertscore: bool = _NOBERT, bertscore_model: Optional[Path] = _BERT,
    bootstrap: int = _BOOT, device: Optional[str] = _DEVICE, name: Optional[str] = _NAME, threads: Optional[int] = _THREADS,
) -> None:
    """Report generation: BLEU-1, ROUGE-1, METEOR, BERTScore per sample (the paper's Table 2), plus more."""
    settings = _settings(paper_sampling, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, batch_size)
    bert, bert_model = _bertscore_model(no_bertscore, bertscore_model)
    _run("report", model, out, name, device, threads, cap_json=data, split=split, limit=limit or None, settings=settings,
         bertscore=bert, bertscore_model=bert_model, n_resamples=bootstrap)


@eval_app.command()
def vqa(
    model: str = _MODEL,
    data: Path = typer.Option(..., "--data", "-d", help="An M3D-VQA CSV, e.g. M3D-VQA/M3D_VQA_test.csv."),
    out: Path = _OUT,
    mode: str = typer.Option("both", "--mode", help="closed, open or both."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="First N questions (the paper: all)."),
    paper_sampling: bool = _PAPER, max_new_tokens: int = _MAXTOK, temperature: Optional[float] = _TEMP,
    top_p: Optional[float] = _TOPP, top_k: Optional[int] = _TOPK, repetition_penalty: Optional[float] = _REP,
    seed: int = _SEED, batch_size: int = _BS, no_bertscore: bool = _NOBERT, bertscore_model: Optional[Path] = _BERT,
    bootstrap: int = _BOOT, device: Optional[str] = _DEVICE, name: Optional[str] = _NAME, threads: Optional[int] = _THREADS,
) -> None:
    """VQA: closed-ended accuracy per question type (Table 3), open-ended text metrics per type (Table 4)."""
    if mode not in _MODES:
        fail(f"--mode must be one of {', '.join(_MODES)}, got {mode!r}", 2)
    settings = _settings(paper_sampling, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, batch_size)
    bert, bert_model = _bertscore_model(no_bertscore, bertscore_model)
    _run("vqa", model, out, name, device, threads, vqa_csv=data, modes=_MODES[mode], limit=limit, settings=settings,
         bertscore=bert, bertscore_model=bert_model, n_resamples=bootstrap)
