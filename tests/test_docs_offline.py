"""/docs works offline: Swagger UI's assets come from this server (fastapi-offline), not from a CDN.

Without a browser (or playwright) the HTML test still checks that every script and stylesheet /docs names
is served here with 200 and that the schema lists the endpoints; with Debian's /usr/bin/chromium the page
is rendered headless with every request off this machine blocked, and the endpoints must show on it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi_offline")
pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from med3dvlm.api import create_app  # noqa: E402
from med3dvlm.inference import Predictor  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import live_server, tiny_vlm_dir  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ENDPOINTS = ["/report", "/vqa", "/embed", "/search", "/health", "/v1/chat/completions", "/v1/models"]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer):
    model = tiny_vlm_dir(tmp_path_factory.mktemp("docs") / "vlm", tiny_tokenizer)
    return create_app(Predictor.from_dir(model), max_upload_mb=1)


def test_docs_assets_are_served_locally(app) -> None:
    client = TestClient(app)
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
        assert any(a.endswith(".js") for a in assets), html.text
        for asset in assets:
            assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
            assert client.get(asset).status_code == 200, asset
        assert "cdn." not in html.text and "fonts.googleapis" not in html.text
    paths = client.get("/openapi.json").json()["paths"]
    assert set(ENDPOINTS) <= set(paths)


@pytest.fixture(scope="module")
def url(app) -> Iterator[str]:
    with live_server(app) as base:
        yield base


def test_docs_render_offline_in_a_browser(url: str, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    blocked: list[str] = []
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                        headless=True, args=ARGS)
        try:
            page = context.new_page()

            def only_here(route) -> None:  # as if offline: anything not from this server fails
                if route.request.url.startswith((url, "data:", "blob:")):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", only_here)
            page.set_default_timeout(30_000)
            page.goto(url + "/docs", wait_until="networkidle")
            page.locator(".opblock").first.wait_for()
            shown = page.locator(".opblock-summary-path").all_inner_texts()
            page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
        finally:
            context.close()
    assert set(ENDPOINTS) <= {s.strip().replace("\u200b", "") for s in shown}, shown
    assert not blocked, blocked
