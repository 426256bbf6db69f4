"""The UI as a process (`python -m sdxl_ui`) and a real headless Chromium driven by Playwright."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import free_port

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Chromium as root in a sandbox without network: no sandbox, no GPU, and no calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]


@contextlib.contextmanager
def ui_process(endpoint: str, tmp_path: Path, **env: str) -> Iterator[str]:
    """`python -m sdxl_ui` on a free loopback port, small defaults for the tiny model; yields its URL."""
    port = free_port()
    full_env = {
        **os.environ,
        "SDXL_ENDPOINT": endpoint,
        "PORT": str(port),
        "SDXL_UI_HOST": "127.0.0.1",
        "SDXL_UI_WIDTH": "128",
        "SDXL_UI_HEIGHT": "128",
        "SDXL_UI_STEPS": "4",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    log = tmp_path / f"ui-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "sdxl_ui"], env=full_env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"the UI did not start:\n{log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextlib.contextmanager
def flaky_server(*refusals: tuple[int, str | None]) -> Iterator[tuple[str, list[str]]]:
    """A model server on loopback that answers each of `refusals` (status, Retry-After or None) in turn,
    then a 64x64 image; yields its URL and the paths it was asked, in order."""
    import base64
    import io

    from PIL import Image
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests.servers import serve_app

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 80, 20)).save(buffer, format="JPEG")
    image = base64.b64encode(buffer.getvalue()).decode()
    pending, asked = list(refusals), []

    async def predict(request: Request) -> JSONResponse:
        asked.append(request.url.path)
        if pending:
            status, retry_after = pending.pop(0)
            headers = {"retry-after": retry_after} if retry_after is not None else {}
            message = "queue full" if status == 429 else "the model is loading"
            return JSONResponse({"error": {"code": status, "message": message}}, status, headers=headers)
        answer = {"images": [image], "seeds": [5], "output_format": "jpeg", "width": 64, "height": 64}
        return JSONResponse({"predictions": [answer]})

    with serve_app(Starlette(routes=[Route("/predict", predict, methods=["POST"])])) as server:
        yield server.url, asked


@contextlib.contextmanager
def recording_proxy(target: str, *, health: bool = True) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A pass-through in front of the real model server at `target` (predict and, unless `health` is False as
    behind Vertex AI, health), keeping each predict body the page sent; yields its URL and the bodies, in order."""
    import json

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.servers import serve_app

    bodies: list[dict[str, Any]] = []

    async def forward(request: Request) -> Response:
        import httpx as client

        data = await request.body()
        if request.method == "POST":
            bodies.append(json.loads(data))
        async with client.AsyncClient(timeout=120) as http:
            answer = await http.request(
                request.method, target + request.url.path, content=data, headers={"content-type": "application/json"}
            )
        return Response(answer.content, answer.status_code, media_type="application/json")

    routes = [Route("/predict", forward, methods=["POST"])]
    routes += [Route("/health", forward, methods=["GET"])] if health else []
    with serve_app(Starlette(routes=routes)) as server:
        yield server.url, bodies
