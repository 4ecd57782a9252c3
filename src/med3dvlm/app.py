"""The web app (`med3dvlm app`): upload a scan, browse it in three planes, get a report, ask questions.

A gradio Blocks page over `med3dvlm.inference.Predictor`. Compared with the original Med3DVLM demo it
binds to 127.0.0.1 with no public share link, accepts NIfTI, NRRD, MHA, .npy, multi-frame DICOM and
zipped DICOM series (not only .nii.gz), applies the model's stored preprocessing (the original fed raw
HU), limits the upload size and type, and handles constant volumes and files without ground truth.

Privacy: nothing here logs file names, temporary paths or DICOM fields, on success or on error:
gradio prints every raised error with its traceback unless told not to, so every message to the user
goes through `_user_error`, which tells it not to. Analytics are off, and the page uses system fonts
so it makes no request outside this machine.
"""

from __future__ import annotations

import logging
import os
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no usage pings

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from .data.preprocess import WINDOW_PRESETS, describe_range, window_bounds  # noqa: E402
from .data.volume import VolumeError, reorient  # noqa: E402
from .inference import Predictor, PreparedImage  # noqa: E402
from .uploads import UPLOAD_SUFFIXES, scrub_paths  # noqa: E402

logger = logging.getLogger(__name__)

PLANES = ("axial", "coronal", "sagittal")
AUTO = "auto (min-max)"
WINDOW_CHOICES = [AUTO, *WINDOW_PRESETS]
DISCLAIMER = "Research software: not a medical device, not for diagnosis."


def _user_error(message: str) -> gr.Error:
    """An error shown in the page and not printed to the server's console (gradio prints tracebacks by default)."""
    return gr.Error(scrub_paths(message), print_exception=False)


def _unexpected(what: str, err: Exception) -> gr.Error:
    # The type and where, never the message: messages can quote paths and file contents.
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    logger.error("%s failed: %s at %s", what, type(err).__name__, f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?")
    return _user_error(f"{what} failed ({type(err).__name__}); the server log says where")


@dataclass
class Loaded:
    """One scan as the page holds it: model input, the LPS array for the viewer, and its source."""

    prepared: PreparedImage
    array: np.ndarray  # (D, H, W) in LPS: axial slices along D, superior last
    spacing: tuple[float, float, float]
    is_hu: bool
    path: str  # where gradio stored the upload, for similar-case search
    name: str


def to_uint8(array: np.ndarray, window: str, is_hu: bool) -> np.ndarray:
    """Grey levels for display: an HU window preset on CT, else the slice's own min-max (constant -> black)."""
    array = np.asarray(array, dtype=np.float32)
    if is_hu and window in WINDOW_PRESETS:
        low, high = window_bounds(window)
    else:
        low, high = float(array.min()), float(array.max())
    if high <= low:  # the original divided by zero here
        return np.zeros(array.shape, np.uint8)
    return (np.clip((array - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def slice_image(loaded: Loaded, plane: str, index: int, window: str) -> np.ndarray:
    """One slice as a uint8 image, superior up and stretched to square millimetres."""
    from PIL import Image

    d, h, w = loaded.array.shape
    sd, sh, sw = loaded.spacing
    if plane == "axial":
        image, (rows_mm, cols_mm) = loaded.array[min(index, d - 1)], (sh, sw)
    elif plane == "coronal":
        image, (rows_mm, cols_mm) = loaded.array[:, min(index, h - 1), :][::-1], (sd, sw)
    else:
        image, (rows_mm, cols_mm) = loaded.array[:, :, min(index, w - 1)][::-1], (sd, sh)
    grey = to_uint8(image, window, loaded.is_hu)
    rows, cols = grey.shape
    scale = 256 / max(rows * rows_mm, cols * cols_mm)  # ~256 px on the long side
    size = (max(1, round(cols * cols_mm * scale)), max(1, round(rows * rows_mm * scale)))
    return np.asarray(Image.fromarray(grey).resize(size, Image.BILINEAR))


def example_scans(folder: str | os.PathLike | None = None, count: int = 3) -> list[Path]:
    """Scans for the examples: those in `folder`, else a few phantom CTs (HU NIfTI) written to a temp folder."""
    if folder is not None:
        files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name.lower().endswith(UPLOAD_SUFFIXES)]
        return files[:12]
    import nibabel as nib

    from .data.phantom import render_hu, sample_case

    out = Path(tempfile.mkdtemp(prefix="med3dvlm-examples-"))
    paths = []
    for i in range(count):
        case = sample_case(i, seed=7)
        hu, spacing = render_hu(case, grid=64)
        affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])  # LPS voxel axes in NIfTI's RAS frame
        path = out / f"phantom_{case['region']}_{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.int16), affine), str(path))
        paths.append(path)
    return paths


def create_demo(predictor: Predictor, examples: Sequence[str | os.PathLike] = (), max_new_tokens: int | None = None) -> gr.Blocks:
    """The Blocks page for `predictor`; `examples` are scans offered below the upload."""
    tokens = max_new_tokens or predictor.settings.max_new_tokens

    def load(path: str | None) -> tuple:
        empty_slider = gr.Slider(minimum=0, maximum=1, value=0, interactive=False)
        if not path:
            return (None, None, None, None, empty_slider, empty_slider, empty_slider, "", "", [], gr.update())
        name = Path(path).name
        try:
            prepared = predictor.prepare(path, keep_volume=True, name=name)
            volume = reorient(prepared.volume, "LPS") if prepared.volume.orientation != "oblique" else prepared.volume
        except VolumeError as err:
            raise _user_error(str(err)) from None
        except Exception as err:  # noqa: BLE001 - the page must say something, and the log must not say the name
            raise _unexpected("reading the scan", err) from None
        # HU display windows only for CT (or unknown) in HU: an MR volume can have HU-like ranges.
        is_hu = describe_range(volume.array) == "hu" and volume.modality in ("CT", "unknown")
        loaded = Loaded(prepared, np.asarray(volume.array), volume.spacing, is_hu, path, name)
        prepared.volume = None  # the viewer keeps its own (reoriented) copy
        sizes = loaded.array.shape
        sliders = [gr.Slider(minimum=0, maximum=n - 1, value=n // 2, step=1, interactive=True) for n in (sizes[0], sizes[1], sizes[2])]
        # The model's own display window when it has a preset one: the slices look like what it was trained on.
        model_window = predictor.spec.hu_window if isinstance(predictor.spec.hu_window, str) else "soft_tissue"
        window = model_window if loaded.is_hu else AUTO
        images = [slice_image(loaded, plane, n // 2, window) for plane, n in zip(PLANES, (sizes[0], sizes[1], sizes[2]))]
        return (loaded, *images, *sliders, _summary(loaded), "", [], gr.update(value=window, interactive=loaded.is_hu))

    def render(loaded: Loaded | None, window: str, a: int, c: int, s: int) -> tuple:
        if loaded is None:
            return None, None, None
        return tuple(slice_image(loaded, plane, int(i), window) for plane, i in zip(PLANES, (a, c, s)))

    def report(loaded: Loaded | None) -> Iterator[str]:
        if loaded is None:
            raise _user_error("Upload a scan or pick an example first.")
        text = ""
        try:
            for piece in predictor.stream(loaded.prepared, None, max_new_tokens=tokens):
                text += piece
                yield text
        except Exception as err:  # noqa: BLE001
            raise _unexpected("generating the report", err) from None
        yield text.strip() or "(the model produced no text)"

    def ask(loaded: Loaded | None, question: str, history: list[dict[str, Any]]) -> Iterator[tuple]:
        if loaded is None:
            raise _user_error("Upload a scan or pick an example first.")
        question = (question or "").strip()
        if not question:
            raise _user_error("Type a question first.")
        history = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        try:
            for piece in predictor.stream(loaded.prepared, question, max_new_tokens=tokens):
                history[-1]["content"] += piece
                yield "", history
        except Exception as err:  # noqa: BLE001
            raise _unexpected("answering", err) from None
        history[-1]["content"] = history[-1]["content"].strip() or "(no answer)"
        yield "", history

    def similar(loaded: Loaded | None) -> list[list[Any]]:
        if loaded is None:
            raise _user_error("Upload a scan or pick an example first.")
        try:
            hits = predictor.search(path=loaded.path, k=5, name=loaded.name)
        except VolumeError as err:
            raise _user_error(str(err)) from None
        except Exception as err:  # noqa: BLE001
            raise _unexpected("the similar-case search", err) from None
        return [[h["rank"], round(h["score"], 4), h["case"], (h["report"] or "")[:300]] for h in hits]

    with gr.Blocks(title="med3dvlm", analytics_enabled=False) as demo:
        gr.Markdown(f"# med3dvlm: 3D CT report generation and VQA\nModel `{predictor.model_name}`. {DISCLAIMER}")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Scan (NIfTI, NRRD, MHA, .npy, DICOM, or a .zip of a DICOM series)",
                                 file_types=list(UPLOAD_SUFFIXES), type="filepath", elem_id="scan-upload")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[upload], label="Examples")
                window = gr.Dropdown(WINDOW_CHOICES, value=AUTO, label="Display window (HU presets need CT in HU)")
                info = gr.Markdown(elem_id="scan-info")
            with gr.Column(scale=2), gr.Row():
                views, sliders = [], []
                for plane in PLANES:
                    with gr.Column(min_width=200):
                        # No "share" button: it would offer to post a patient's slice to a public Space.
                        views.append(gr.Image(label=plane, type="numpy", interactive=False, height=280, buttons=["fullscreen"]))
                        sliders.append(gr.Slider(0, 1, value=0, step=1, label=f"{plane} slice", interactive=False))
        with gr.Row():
            with gr.Column():
                report_button = gr.Button("Generate report", variant="primary", elem_id="report-button")
                report_box = gr.Textbox(label="Report", lines=8, elem_id="report-text", buttons=["copy"])
            with gr.Column():
                chat = gr.Chatbot(label="Ask about this scan", height=300, elem_id="vqa-chat", buttons=["copy"], feedback_options=None)
                with gr.Row():
                    question = gr.Textbox(placeholder="e.g. Is there a lesion in the liver?", show_label=False, scale=4)
                    ask_button = gr.Button("Ask", scale=1)
        if predictor.has_index:
            with gr.Row():
                similar_button = gr.Button("Find similar cases")
                table = gr.Dataframe(headers=["rank", "score", "case", "report"], label="Similar cases in the index")
            similar_button.click(similar, [state], [table])

        upload.change(load, [upload], [state, *views, *sliders, info, report_box, chat, window])
        for control in (window, *sliders):
            control.change(render, [state, window, *sliders], views, show_progress="hidden")
        report_button.click(report, [state], [report_box])
        ask_button.click(ask, [state, question, chat], [question, chat])
        question.submit(ask, [state, question, chat], [question, chat])
    return demo


def _summary(loaded: Loaded) -> str:
    pre = loaded.prepared.preprocessing
    inp = pre["input"]
    lines = [
        f"**{loaded.name}**: {inp['modality']}, {' x '.join(map(str, inp['shape']))} voxels, spacing "
        f"{', '.join(f'{s:g}' for s in inp['spacing'])} mm, values {inp['min']:g} to {inp['max']:g} ({inp['looks_like']})",
        "",
        "Preprocessing: " + "; ".join(pre["steps"]) + ".",
    ]
    if not loaded.is_hu:
        lines.append("\nNot in Hounsfield units: slices are shown with their own min-max, window presets are off.")
    lines += [f"\n> {w}" for w in pre["warnings"]]
    return "\n".join(lines)


def launch(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_mb: float = 512,
    examples: str | os.PathLike | None = None,
    prevent_thread_lock: bool = False,
) -> gr.Blocks:
    """Build and start the app: local-only by default, never a public share link."""
    demo = create_demo(predictor, example_scans(examples))
    # System fonts: the default theme would fetch Google Fonts, which an offline hospital network blocks.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up probes of the local server
    demo.queue(default_concurrency_limit=1)  # one generation at a time: the model is not re-entrant
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=f"{max_upload_mb:g}mb",
        prevent_thread_lock=prevent_thread_lock,
        show_error=True,
        theme=theme,
        footer_links=[],
        quiet=True,  # gradio's banner suggests share=True, which is exactly what this app avoids
    )
    logger.info("med3dvlm app running on http://%s:%d/", "[" + host + "]" if ":" in host else host, demo.server_port)
    return demo
