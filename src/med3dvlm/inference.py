"""Inference on your own scans: a `Predictor` that loads a saved VLM once and answers for files.

It reads NIfTI, DICOM (a series folder, a multi-frame file, or a zip of a series), NRRD, MHA and .npy
through the data layer, applies the preprocessing stored with the model (`load_for_model`, the
original demo applied none), generates a report or an answer, and returns everything needed to trust
the result: the text, what preprocessing did, timings and the generation settings. The CLI (`med3dvlm
predict`), the REST API (`med3dvlm serve`) and the web app (`med3dvlm app`) are thin layers over it.

Optionally a contrastive model and a case index (see `med3dvlm.search`) give image/text embeddings and
similar prior cases. Zipped uploads are read through `med3dvlm.uploads`, which extracts them with limits
on size, file count and names.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .batching import MicroBatcher, settle_arrivals
from .data.limits import ReadLimits
from .data.preprocess import PreprocessSpec, preprocess_with_report
from .data.readers import load_volume
from .data.volume import Volume, VolumeError, VolumeTooLarge
from .generation import GenerationSettings
from .uploads import readable_path, scrub_paths

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- results


# The settings `Med3DVLM.generate_text` takes: what a prediction records and a request may change.
PREDICTION_SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed")


def prediction_settings(**values: Any) -> GenerationSettings:
    """Settings for the predictor: greedy and not reseeded unless `values` say otherwise."""
    unknown = set(values) - set(PREDICTION_SETTINGS)
    if unknown:
        raise TypeError(f"unknown generation settings: {', '.join(sorted(unknown))}")
    return GenerationSettings(**{"seed": None, **values})


@dataclass
class PreparedImage:
    """A volume read and preprocessed for the model, kept so several questions need one read."""

    source: str
    tensor: torch.Tensor  # (1, D, H, W) float32 in [0, 1]
    preprocessing: dict[str, Any]
    volume: Volume | None = None  # the raw volume (for viewers); None when not kept
    seconds: float = 0.0


@dataclass
class Prediction:
    """One answer: the text plus everything needed to judge and reproduce it."""

    source: str
    task: str  # "report" or "vqa"
    question: str | None
    text: str
    preprocessing: dict[str, Any]
    generation: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Request:
    """A `predict` call waiting for its batch."""

    image: PreparedImage
    question: str | None
    generation: dict[str, Any]
    submitted: float = field(default_factory=time.perf_counter)


# ------------------------------------------------------------------------------------------- predictor


class Predictor:
    """A loaded VLM (and optionally a case index) answering for scans on disk.

    Args:
        model: a `Med3DVLM` with its tokenizer.
        model_name: shown in results (usually the model folder).
        spec: the preprocessing; default, the one stored with the vision encoder.
        settings: default generation settings; each call may override fields.
        index: a loaded `med3dvlm.search.CaseIndex` for /embed and /search (its contrastive model embeds).
        limits: the largest volume a read may claim or unpack to (default `ReadLimits()`; the servers
            pass the lower `SERVER_LIMITS`).
        strict: refuse volumes the readers accept with a warning (uneven slice gaps, assumed spacing).
        max_concurrent_reads: reads (file -> tensor) running at once; each may hold a volume up to
            `limits`, so this bounds the memory of parallel requests.
        include_private: put the DICOM series UID and description into results (off: they identify).
        max_batch: greedy `predict` calls arriving together from several threads share one generate call, up
            to this many (see `med3dvlm.batching`); each answer is the one it gets alone. 1: one call each.
        batch_window_ms: how long the first of them waits for others before its batch starts; calls still reading
            their volume (or, on a server, still being received: `batching.MicroBatcher.arriving`) extend that, up to
            `batch_max_wait_ms`.
    """

    def __init__(
        self,
        model: Any,
        model_name: str = "",
        spec: PreprocessSpec | None = None,
        settings: GenerationSettings | None = None,
        index: Any = None,
        limits: ReadLimits | None = None,
        strict: bool = False,
        max_concurrent_reads: int = 2,
        include_private: bool = False,
        max_batch: int = 1,
        batch_window_ms: float = 10.0,
        batch_max_wait_ms: float = 500.0,
    ) -> None:
        self.model = model.eval()
        self.model_name = model_name
        self.spec = spec or PreprocessSpec.for_model(model.vision.config)
        self.settings = settings or prediction_settings()
        self.index = index
        self.limits = limits or ReadLimits()
        self.strict = strict
        self.include_private = include_private
        # Generation seeds torch's global RNG and the model is not re-entrant: one request at a time.
        self._lock = threading.Lock()
        # Reads run outside that lock (they need no model), so without a bound N uploads held N volumes.
        self._reads = threading.BoundedSemaphore(max(1, int(max_concurrent_reads)))
        self.max_batch = max(1, int(max_batch))
        self.batcher: MicroBatcher[_Request, Prediction] | None = None
        if self.max_batch > 1:
            self.batcher = MicroBatcher(self._generate_requests, self.max_batch, max(0.0, batch_window_ms) / 1000,
                                        max(0.0, batch_max_wait_ms) / 1000)

    @classmethod
    def from_dir(
        cls,
        model_dir: str | os.PathLike,
        index_dir: str | os.PathLike | None = None,
        clip_dir: str | os.PathLike | None = None,
        settings: GenerationSettings | None = None,
        device: str | None = None,
        **options: Any,
    ) -> Predictor:
        """Load a saved VLM folder or hub id, and a case index (with its contrastive model, or `clip_dir`) if given.

        `options` are the other options of `Predictor` (limits, strict, max_concurrent_reads, include_private,
        max_batch, batch_window_ms, batch_max_wait_ms).
        """
        from .hub import CONFIG_NAME, is_repo_id, resolve_model_dir
        from .loading import load_for_inference, resolve_device

        name = os.fspath(model_dir) if is_repo_id(model_dir) else Path(model_dir).name  # a snapshot's folder is a hash
        model_dir = resolve_model_dir(model_dir)
        if not (model_dir / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json; not a saved med3dvlm model folder")
        device = resolve_device(device)
        model = load_for_inference(model_dir, device, requires=("generate_text",), kind="a vision-language model (Med3DVLM)")
        index = None
        if index_dir is not None:
            from .search import CaseIndex

            index = CaseIndex(index_dir, device=device, model_dir=clip_dir)
        return cls(model, model_name=name, settings=settings, index=index, **options)

    @property
    def has_index(self) -> bool:
        return self.index is not None

    def _settings(self, overrides: dict[str, Any]) -> GenerationSettings:
        unknown = set(overrides) - set(PREDICTION_SETTINGS)
        if unknown:
            raise TypeError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        settings = self.settings.replace(**{k: v for k, v in overrides.items() if v is not None})
        if settings.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {settings.max_new_tokens}")
        return settings

    # -- reading -------------------------------------------------------------------------------
    def read(
        self,
        path: str | os.PathLike,
        spec: PreprocessSpec,
        series_uid: str | None = None,
        name: str | None = None,
        limits: ReadLimits | None = None,
        keep_volume: bool = False,
    ) -> PreparedImage:
        """The one path from a file (any type, a zip too) to a model input: read, check, preprocess with `spec`.

        Reports, answers, embeddings and search all read through here, so the same checks and the same
        intensity mapping apply to all of them. At most `max_concurrent_reads` run at once.

        Raises:
            VolumeError: naming `name` (else the path) and the reason, never a server path;
                `VolumeTooLarge` when the volume is over the read limits.
        """
        start = time.perf_counter()
        shown = name or str(path)
        limits = limits or self.limits
        real: Path | None = None
        with self._reads:
            try:
                with readable_path(path, limits=limits) as real, warnings.catch_warnings(record=True) as caught:
                    # Range mismatches are recorded in the report, and library warnings can quote file
                    # names or DICOM values: none of them may reach stderr or a log.
                    warnings.simplefilter("always")
                    volume = load_volume(real, series_uid=series_uid, limits=limits, strict=self.strict)
                    tensor, report = preprocess_with_report(volume, spec, include_private=self.include_private)
            except VolumeError as err:
                raise type(err)(shown, self._hide(err.reason, path, real, shown)) from None
            except MemoryError:
                raise VolumeTooLarge(shown, "the volume does not fit in this machine's memory") from None
        if caught:
            logger.debug("%d library warning(s) while reading (%s)", len(caught), ", ".join(sorted({w.category.__name__ for w in caught})))
        preprocessing = report.to_dict()
        preprocessing["spec"] = spec.to_dict()
        if volume.source != shown:  # an upload's temporary name or an extracted zip's folder: show the input
            preprocessing["input"]["source"] = shown
            preprocessing["warnings"] = [self._hide(w, path, real, shown) for w in preprocessing["warnings"]]
        seconds = time.perf_counter() - start
        # Shapes and timings only: file names can carry patient identifiers.
        logger.info("read a volume of shape %s in %.2f s", list(volume.shape), seconds)
        return PreparedImage(shown, tensor, preprocessing, volume if keep_volume else None, seconds)

    @staticmethod
    def _hide(text: str, path: str | os.PathLike, real: Path | None, shown: str) -> str:
        """`text` with the input's real (temporary) paths shown as `shown`, and no other absolute path."""
        replacements = {str(path): shown}
        if real is not None:
            replacements[str(real)] = shown
            if real != Path(path):  # inside an extracted zip: the temporary folder
                replacements[str(real.parent)] = shown
        return scrub_paths(text, replacements)

    def prepare(
        self,
        path: str | os.PathLike,
        series_uid: str | None = None,
        keep_volume: bool = False,
        name: str | None = None,
        limits: ReadLimits | None = None,
    ) -> PreparedImage:
        """Read a file, DICOM folder or zipped series and preprocess it as the VLM expects.

        `name` replaces the path in the result and in error messages (e.g. the original name of an
        upload stored under a temporary name). `limits` overrides the predictor's read limits.

        Raises:
            VolumeError: the input cannot be read; the message names it and says why.
        """
        return self.read(path, self.spec, series_uid=series_uid, name=name, limits=limits, keep_volume=keep_volume)

    # -- generation ----------------------------------------------------------------------------
    def predict(
        self,
        image: str | os.PathLike | PreparedImage,
        question: str | None = None,
        series_uid: str | None = None,
        **generation: Any,
    ) -> Prediction:
        """A report (question None) or an answer for one scan (a path or a `PreparedImage`).

        With `max_batch` > 1, a greedy call waits (up to the batch window) for concurrent calls from other threads
        and is generated with them; sampled calls run alone, since a seeded sample depends on its batch.
        """
        if self.batcher is None or self._settings(generation).do_sample:
            settle_arrivals()  # a served request that will not join a batch: none waits for it
            return self.predict_many([image], [question], series_uid=series_uid, **generation)[0]
        with self.batcher.arriving():  # a batch being gathered waits for this read
            # Read before queueing: the read has its own bound, and a batch should wait only for generation.
            if not isinstance(image, PreparedImage):
                image = self.prepare(image, series_uid)
            settings = self._settings(generation)
            # Greedy tokens depend on max_new_tokens alone among the settings, so that is all a batch must share.
            return self.batcher.submit(("greedy", settings.max_new_tokens), _Request(image, question, generation))

    def predict_many(
        self,
        images: Sequence[str | os.PathLike | PreparedImage],
        questions: Sequence[str | None],
        batch_size: int = 1,
        series_uid: str | None = None,
        **generation: Any,
    ) -> list[Prediction]:
        """Answers for several scans, `batch_size` volumes per generate call."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        out: list[Prediction] = []
        for start in range(0, len(images), max(1, batch_size)):
            prepared = [
                im if isinstance(im, PreparedImage) else self.prepare(im, series_uid)
                for im in images[start : start + batch_size]
            ]
            out.extend(self._generate(prepared, list(questions[start : start + batch_size]), generation))
        return out

    def _generate(self, prepared: list[PreparedImage], questions: list[str | None], overrides: dict[str, Any]) -> list[Prediction]:
        settings = self._settings(overrides)
        device = self.model.llm.get_input_embeddings().weight.device
        batch = torch.stack([p.tensor for p in prepared]).to(device)
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            texts = self.model.generate_text(batch, questions, **settings.to_dict(PREDICTION_SETTINGS))
        seconds = time.perf_counter() - start
        logger.info("generated %d answer(s) in %.2f s", len(texts), seconds)
        return [
            Prediction(
                source=p.source,
                task="report" if q is None else "vqa",
                question=q,
                text=t.strip(),
                preprocessing=p.preprocessing,
                generation=settings.to_dict(PREDICTION_SETTINGS),
                timings={"read_s": round(p.seconds, 4), "generate_s": round(seconds / len(prepared), 4)},
                model=self.model_name,
            )
            for p, q, t in zip(prepared, questions, texts)
        ]

    def _generate_requests(self, requests: list[_Request]) -> list[Prediction]:
        """One generate call for a batch the batcher gathered (same max_new_tokens, all greedy)."""
        start = time.perf_counter()
        predictions = self._generate([r.image for r in requests], [r.question for r in requests], requests[0].generation)
        seconds = round(time.perf_counter() - start, 4)
        for request, prediction in zip(requests, predictions):
            # The call ran with the first request's settings; each result records its own request's, which
            # differ at most in knobs greedy decoding ignores (seed, temperature, top_p).
            prediction.generation = self._settings(request.generation).to_dict(PREDICTION_SETTINGS)
            # A served request waited for the whole call, not for its share of it.
            prediction.timings.update(generate_s=seconds, queue_s=round(start - request.submitted, 4), batch_size=len(requests))
        return predictions

    def stream(self, image: PreparedImage, question: str | None = None, **generation: Any) -> Iterator[str]:
        """Yield the text piece by piece while it is generated (the web app, streamed chat completions).

        Never batched: the pieces of one answer are sent as they come, so it has the model to itself.
        """
        settle_arrivals()
        settings = self._settings(generation)
        device = self.model.llm.get_input_embeddings().weight.device
        with self._lock:
            yield from self.model.stream_text(image.tensor.unsqueeze(0).to(device), question, **settings.to_dict(PREDICTION_SETTINGS))

    # -- embeddings and search -----------------------------------------------------------------
    def _require_index(self) -> Any:
        if self.index is None:
            raise LookupError("no case index is loaded; start with --index DIR (built by `med3dvlm index build`)")
        return self.index

    def embed_image(self, path: str | os.PathLike, name: str | None = None, limits: ReadLimits | None = None) -> list[float]:
        """The contrastive image embedding (unit norm) of a scan, read as `prepare` reads (the index model's spec)."""
        index = self._require_index()
        prepared = self.read(path, index.spec, name=name, limits=limits)
        return torch.nn.functional.normalize(index.embed_tensor(prepared.tensor).float(), dim=-1)[0].tolist()

    def embed_text(self, text: str) -> list[float]:
        """The contrastive text embedding (unit norm) of a report or description."""
        vector = self._require_index().embed_text(text)
        return torch.nn.functional.normalize(vector.float(), dim=-1)[0].tolist()

    def search(
        self,
        path: str | os.PathLike | None = None,
        text: str | None = None,
        k: int = 5,
        name: str | None = None,
        limits: ReadLimits | None = None,
    ) -> list[dict[str, Any]]:
        """The `k` most similar indexed cases to a scan or a text, best first."""
        index = self._require_index()
        if (path is None) == (text is None):
            raise ValueError("give exactly one of an image or a text to search with")
        if path is not None:
            embedding = torch.tensor([self.embed_image(path, name=name, limits=limits)])
        else:
            embedding = torch.tensor([self.embed_text(text or "")])
        return [h.to_dict() for h in index.query(embedding, k=k)]

    def describe(self) -> dict[str, Any]:
        """What is loaded: model name, input size, preprocessing, default settings, index size."""
        return {
            "model": self.model_name,
            "input_size": list(self.spec.size),
            "preprocess": self.spec.to_dict(),
            "generation": self.settings.to_dict(PREDICTION_SETTINGS),
            "index": {"items": len(self.index), "has_text": bool(self.index.meta.get("has_text"))} if self.index else None,
        }
