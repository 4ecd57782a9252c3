"""The web app end to end in headless Chromium: upload a NIfTI, generate a report, ask a question.

Drives Debian's /usr/bin/chromium with Playwright (no browser download). The app runs in this process
on a free localhost port with the tiny random VLM, so the expected text is computed by the same
`Predictor` and compared exactly. Every request the page makes must stay on this machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytest.importorskip("gradio", reason="gradio is not installed")

from med3dvlm.app import create_demo, example_scans, launch  # noqa: E402
from med3dvlm.inference import GenerationSettings, Predictor  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import hu_phantom, tiny_vlm_dir, write_nifti  # noqa: E402

# The flags this machine needs (see the machine notes): no sandbox as root, and no background networking.
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
LOCAL = ("http://127.0.0.1", "http://localhost", "data:", "blob:", "about:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("app")
    predictor = Predictor.from_dir(tiny_vlm_dir(root / "model", tiny_tokenizer), settings=GenerationSettings(max_new_tokens=8))
    port = free_port()
    demo = launch(predictor, port=port, max_upload_mb=5, examples=None, prevent_thread_lock=True)
    yield predictor, demo, f"http://127.0.0.1:{port}/", root
    demo.close()


@pytest.fixture
def page(tmp_path: Path):
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS
        )
        page = context.new_page()
        page.external = []  # type: ignore[attr-defined]
        page.on("request", lambda r: None if r.url.startswith(LOCAL) else page.external.append(r.url))  # type: ignore[attr-defined]
        page.set_default_timeout(30_000)
        yield page
        context.close()


def test_upload_generate_and_ask(served, page, caplog: pytest.LogCaptureFixture) -> None:
    predictor, demo, url, root = served
    # A name like the ones people give exports: it must show in the page and never in the logs.
    scan = write_nifti(root / "Doe_Jane_19610101.nii.gz", hu_phantom(seed=5))
    prepared = predictor.prepare(scan)
    expected_report = predictor.predict(prepared).text or "(the model produced no text)"
    expected_answer = predictor.predict(prepared, "Is there a lesion?").text or "(no answer)"

    assert demo.server_name == "127.0.0.1" and demo.share_url is None  # local only, no public link
    with caplog.at_level(logging.DEBUG):
        page.goto(url, wait_until="domcontentloaded")
        page.locator("#scan-upload input[type=file]").set_input_files(str(scan))
        info = page.locator("#scan-info")
        info.get_by_text("Preprocessing").wait_for()
        assert "20 x 40 x 36 voxels" in info.inner_text() and "Doe_Jane_19610101.nii.gz" in info.inner_text()
        assert page.locator("img").count() >= 3  # the three planes are drawn

        page.locator("#report-button").click()
        page.wait_for_function("() => document.querySelector('#report-text textarea').value.length > 0")
        page.wait_for_function(
            "t => document.querySelector('#report-text textarea').value === t", arg=expected_report, timeout=15_000
        )

        page.get_by_placeholder("e.g. Is there a lesion in the liver?").fill("Is there a lesion?")
        page.get_by_role("button", name="Ask").click()
        chat = page.locator("#vqa-chat")
        chat.get_by_text("Is there a lesion?").wait_for()
        chat.get_by_text(expected_answer, exact=True).wait_for()
    assert page.external == []  # type: ignore[attr-defined] # fonts, analytics: nothing leaves the machine
    assert "Doe_Jane" not in caplog.text


def test_broken_scan_is_explained_in_the_page_and_not_logged(served, page, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             capfd: pytest.CaptureFixture) -> None:
    """The error path, end to end: gradio printed every gr.Error (message and traceback) to the console."""
    _, _, url, _ = served
    broken = tmp_path / "Doe_Jane_19610101.nii.gz"
    broken.write_bytes(b"\x1f\x8b not a gzip stream")
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        page.goto(url, wait_until="domcontentloaded")
        page.locator("#scan-upload input[type=file]").set_input_files(str(broken))
        page.get_by_text("Doe_Jane_19610101.nii.gz: not a readable NIfTI file").first.wait_for()
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err):
        assert "Doe_Jane" not in text


def test_wrong_type_is_refused_in_the_page(served, page, tmp_path: Path) -> None:
    _, _, url, _ = served
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scan")
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#scan-upload input[type=file]").set_input_files(str(notes))
    page.get_by_text("Invalid file type").first.wait_for()
    assert "Preprocessing" not in page.locator("#scan-info").inner_text()


def test_examples_and_page_without_index(tmp_path: Path, served) -> None:
    predictor = served[0]
    scans = example_scans(count=2)
    try:
        assert [p.name.endswith(".nii.gz") for p in scans] == [True, True]
        assert predictor.prepare(scans[0]).preprocessing["input"]["looks_like"] == "hu"
    finally:
        shutil.rmtree(scans[0].parent, ignore_errors=True)
    demo = create_demo(predictor, examples=[])
    import gradio as gr

    labels = {block.value for block in demo.blocks.values() if isinstance(block, gr.Button)}
    assert "Generate report" in labels and "Find similar cases" not in labels  # no index, no search button
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
