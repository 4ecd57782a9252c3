"""Case search: find the prior cases most similar to a new scan or to a text description.

The paper motivates the contrastive encoder with retrieval of "similar prior cases". An index is the
unit-norm embeddings of a collection of scans (and, for a dataset, of their reports) under one trained
Contrastive3D, stored as::

    <index>/embeddings.safetensors   {"image": (N, E) float32, "text": (N, E) float32 when reports exist}
    <index>/index.json               model folder, embedding size, and one record per scan (id, image, case, report)

Queries are embedded with the same model and scored by cosine similarity with a batched matrix product
(or a FAISS inner-product index when `faiss` is installed and the index is large). By default the hits
are grouped by case (best-scoring series of each case), because a case with three series is still one
prior case.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data.limits import ReadLimits
from .data.preprocess import PreprocessSpec, load_for_model
from .data.readers import VOLUME_SUFFIXES, discover_volumes
from .fileio import write_json_atomic
from .loading import load_contrastive

logger = logging.getLogger(__name__)

INDEX_JSON = "index.json"
EMBEDDINGS = "embeddings.safetensors"
_FAISS_MIN = 50_000  # below this a matrix product is as fast and needs no extra package


class SearchIndexError(ValueError):
    """An index folder is missing or inconsistent; the message names the file."""


@dataclass
class Hit:
    rank: int
    score: float
    id: str
    image: str
    case: str
    report: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_query_image(path: str | os.PathLike, model: Any, limits: ReadLimits | None = None) -> torch.Tensor:
    """A (1, D, H, W) model input: the file read and preprocessed with the spec stored in `model`'s config.

    Every file type takes this one path. A prepared .npy used to skip the preprocessing, so the same
    volume in HU and min-maxed embedded far apart (cosine -0.4) and a 1x1x1 array was accepted.
    """
    return load_for_model(path, model.config, limits=limits)[0]


@torch.no_grad()
def _embed_images(model: Any, paths: Sequence[Path], batch_size: int, progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(paths), batch_size), desc="embed images", unit="batch", disable=not progress):
        batch = torch.stack([load_query_image(p, model) for p in paths[start : start + batch_size]])
        out.append(model.encode_image(batch.to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.config.embed_dim)


@torch.no_grad()
def _embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    out = [model.encode_text(**model.tokenize(tokenizer, texts[i : i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.config.embed_dim)


def build_index(
    model_dir: str | os.PathLike,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    splits: Iterable[str] | None = None,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every scan of `source` (an M3D_Cap.json, or a folder of volumes) and write an index.

    For a dataset JSON the reports are embedded too (so text queries can also match reports), and
    `splits` chooses which splits to include (default: all of train/validation/test).
    """
    from safetensors.torch import save_file

    from .hub import resolve_model_dir

    model_dir = resolve_model_dir(model_dir)  # a hub id: the index records the snapshot folder it embedded with
    model, tokenizer = load_contrastive(model_dir, device, require_tokenizer=False)
    source = Path(source)
    records: list[dict[str, Any]] = []
    if source.is_file() and source.suffix == ".json":
        from .data.m3d import CAP_SPLITS, find_root, read_cap_json, resolve_in_root
        from .data.splits import case_of

        data = read_cap_json(source)
        chosen = list(splits) if splits else list(CAP_SPLITS)
        unknown = [s for s in chosen if s not in data]
        if unknown:
            raise KeyError(f"{source}: no split(s) {', '.join(unknown)}; available: {', '.join(data)}")
        seen: set[str] = set()
        items = [it for s in chosen for it in data[s] if not (it["image"] in seen or seen.add(it["image"]))]
        if not items:
            raise ValueError(f"{source}: the chosen splits are empty")
        root = find_root(source, items[0]["image"])
        paths = [resolve_in_root(root, it["image"]) for it in items]
        reports = [resolve_in_root(root, it["text"]).read_text(encoding="utf-8").strip() for it in items]
        for it, rep in zip(items, reports):
            records.append({"id": it["image"], "image": it["image"], "case": case_of(it["image"]), "report": rep})
        base = str(root.resolve())
    elif source.is_dir():
        paths = discover_volumes(source)
        if not paths:
            raise ValueError(f"{source}: no volumes found (looked for {', '.join(VOLUME_SUFFIXES)} and DICOM folders)")
        reports = []
        for p in paths:
            rel = p.relative_to(source).as_posix() if p != source else "."
            records.append({"id": rel, "image": rel, "case": str(Path(rel).parent.as_posix()) if p.is_file() else rel, "report": None})
        base = str(source.resolve())
    else:
        raise ValueError(f"{source}: expected an M3D_Cap.json or a folder of volumes")
    t0 = time.perf_counter()
    tensors = {"image": _embed_images(model, paths, batch_size, progress)}
    if reports and tokenizer is not None:
        tensors["text"] = _embed_texts(model, tokenizer, reports, batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / EMBEDDINGS))
    meta = {
        "model_dir": str(Path(model_dir).resolve()),
        "source": str(source.resolve()),
        "base": base,
        "embed_dim": int(tensors["image"].shape[1]),
        "count": len(records),
        "has_text": "text" in tensors,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "items": records,
    }
    write_json_atomic(out / INDEX_JSON, meta, indent=1)  # the JSON last: an index without it is visibly incomplete
    logger.info("indexed %d scans in %.1f s", len(records), time.perf_counter() - t0)  # no path: it can name a patient
    return {"index": str(out), "count": len(records), "has_text": meta["has_text"], "seconds": round(time.perf_counter() - t0, 1)}


def top_k(database: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the k largest inner products of each query row against the database rows.

    Batched over database chunks so memory stays bounded for large collections; FAISS (IndexFlatIP) is
    used instead when installed and the database is large.
    """
    k = min(k, database.shape[0])
    if database.shape[0] >= _FAISS_MIN:
        try:
            import faiss  # type: ignore[import-not-found]

            index = faiss.IndexFlatIP(database.shape[1])
            index.add(database.numpy().astype("float32"))
            scores, idx = index.search(queries.numpy().astype("float32"), k)
            return torch.from_numpy(scores), torch.from_numpy(idx).long()
        except ImportError:
            pass
    best_s = torch.full((queries.shape[0], 0), float("-inf"))
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    for start in range(0, database.shape[0], chunk):
        s = queries @ database[start : start + chunk].T
        s_all = torch.cat([best_s, s], dim=1)
        i_all = torch.cat([best_i, torch.arange(start, start + s.shape[1]).expand(queries.shape[0], -1)], dim=1)
        best_s, pos = s_all.topk(min(k, s_all.shape[1]), dim=1)
        best_i = i_all.gather(1, pos)
    return best_s, best_i


class CaseIndex:
    """A loaded index with its model; `search_image(path)` and `search_text(text)` return ranked `Hit`s."""

    def __init__(self, directory: str | os.PathLike, device: str | None = None, model_dir: str | os.PathLike | None = None) -> None:
        from safetensors.torch import load_file

        self.directory = Path(directory)
        meta_path = self.directory / INDEX_JSON
        if not meta_path.is_file():
            raise SearchIndexError(f"{meta_path}: missing; build the index with `med3dvlm index build`")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise SearchIndexError(f"{meta_path}: not valid JSON ({err})") from None
        emb_path = self.directory / EMBEDDINGS
        if not emb_path.is_file():
            raise SearchIndexError(f"{emb_path}: missing")
        self.embeddings = {k: F.normalize(v.float(), dim=-1) for k, v in load_file(str(emb_path)).items()}
        if self.embeddings["image"].shape[0] != len(self.meta["items"]):
            raise SearchIndexError(f"{emb_path}: {self.embeddings['image'].shape[0]} embeddings for {len(self.meta['items'])} items in {INDEX_JSON}")
        self.model, self.tokenizer = load_contrastive(model_dir or self.meta["model_dir"], device, require_tokenizer=False)

    def __len__(self) -> int:
        return len(self.meta["items"])

    @property
    def spec(self) -> PreprocessSpec:
        """The preprocessing of the index's contrastive model (what `embed_tensor` expects)."""
        return PreprocessSpec.for_model(self.model.config)

    @torch.no_grad()
    def embed_image(self, path: str | os.PathLike, limits: ReadLimits | None = None) -> torch.Tensor:
        return self.embed_tensor(load_query_image(path, self.model, limits=limits))

    @torch.no_grad()
    def embed_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """The (1, E) embedding of one preprocessed (1, D, H, W) image."""
        return self.model.encode_image(image.unsqueeze(0).to(next(self.model.parameters()).device)).float().cpu()

    @torch.no_grad()
    def embed_text(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise SearchIndexError(f"{self.meta['model_dir']}: no tokenizer saved with the model; text search is unavailable")
        return self.model.encode_text(**self.model.tokenize(self.tokenizer, [text])).float().cpu()

    def search_image(self, path: str | os.PathLike, k: int = 5, against: str = "image", per_case: bool = True) -> list[Hit]:
        return self.query(self.embed_image(path), k, against, per_case)

    def search_text(self, text: str, k: int = 5, against: str = "image", per_case: bool = True) -> list[Hit]:
        return self.query(self.embed_text(text), k, against, per_case)

    def query(self, embedding: torch.Tensor, k: int = 5, against: str = "image", per_case: bool = True) -> list[Hit]:
        """Top-k items (or cases) for one (1, E) query embedding against the "image" or "text" embeddings."""
        if against not in self.embeddings:
            raise SearchIndexError(f"{self.directory}: the index has no {against!r} embeddings (has {', '.join(self.embeddings)})")
        database = self.embeddings[against]
        query = F.normalize(embedding.float().reshape(1, -1), dim=-1)
        # Ask for more than k when grouping by case, since several series of one case may rank together.
        want = min(len(self), k * 8) if per_case else k
        while True:
            scores, idx = top_k(database, query, want)
            hits: list[Hit] = []
            cases: set[str] = set()
            for s, i in zip(scores[0].tolist(), idx[0].tolist()):
                item = self.meta["items"][i]
                if per_case:
                    if item["case"] in cases:
                        continue
                    cases.add(item["case"])
                hits.append(Hit(len(hits) + 1, float(s), item["id"], item["image"], item["case"], item.get("report")))
                if len(hits) == k:
                    return hits
            if want >= len(self):
                return hits
            want = min(len(self), want * 4)
