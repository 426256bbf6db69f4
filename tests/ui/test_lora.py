"""The page's LoRA adapter menu: the request it builds, the names it offers (the server's health, or
SDXL_UI_LORAS where the page cannot ask), and the server's refusals it shows. The page itself, with a real
model server that preloads an adapter, is in test_browser_lora.py."""

from __future__ import annotations

import base64
import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from sdxl_ui import loras
from sdxl_ui.app import generate
from sdxl_ui.backend import HttpBackend
from sdxl_ui.request import Choices, build_body
from tests.ui.conftest import ui_process

PHOTO = Image.new("RGB", (96, 64), (40, 120, 200))


def _editor() -> dict[str, Any]:
    """The inpainting editor's value: the photo and a painted square."""
    layer = Image.new("RGBA", PHOTO.size, (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (8, 8, 40, 40))
    return {"background": PHOTO, "layers": [layer], "composite": PHOTO}


TABS: dict[str, dict[str, Any]] = {
    "text-to-image": {},
    "image-to-image": {"image": PHOTO},
    "inpainting": {"editor": _editor()},
}


@pytest.mark.parametrize("mode", list(TABS))
def test_none_sends_the_request_of_before_on_every_tab(mode: str) -> None:
    before, _ = build_body(Choices("a fox", mode=mode, **TABS[mode]))
    for scale in (1.0, -1.5):
        none, _ = build_body(Choices("a fox", mode=mode, lora="none", lora_scale=scale, **TABS[mode]))
        assert json.dumps(none) == json.dumps(before) and "lora" not in none["parameters"]


def test_none_is_the_text_to_image_body_byte_for_byte() -> None:
    body, _ = build_body(Choices("a fox", seed=7, randomize=False, lora="none"))
    assert json.dumps(body) == json.dumps(
        {
            "instances": [{"prompt": "a fox", "seed": 7}],
            "parameters": {
                "num_inference_steps": 30,
                "guidance_scale": 5.0,
                "num_images": 1,
                "scheduler": "euler",
                "output_format": "jpeg",
                "quality": 92,
                "width": 1024,
                "height": 1024,
            },
        }
    )


@pytest.mark.parametrize("mode", list(TABS))
def test_an_adapter_is_sent_by_name_and_scale_on_every_tab(mode: str) -> None:
    # the slider's steps of 0.05 reach the page as JavaScript sums
    body, _ = build_body(Choices("a fox", mode=mode, lora="pixel-art", lora_scale=0.7000000000000001, **TABS[mode]))
    assert body["parameters"]["lora"] == [{"name": "pixel-art", "scale": 0.7}]
    assert body["parameters"]["num_inference_steps"] == 30  # everything else as before
    none, _ = build_body(Choices("a fox", mode=mode, **TABS[mode]))
    assert {k: v for k, v in body["parameters"].items() if k != "lora"} == none["parameters"]


def test_sdxl_ui_loras_names_follow_the_servers_rule() -> None:
    names, bad = loras.parse_names(" Pixel-Art, ,watercolor.v2,pixel-art,Bad Name!,none,../x," + "a" * 65)
    assert names == ["pixel-art", "watercolor.v2"]  # lowercased, each once, in order
    assert bad == ["Bad Name!", "none", "../x", "a" * 65]
    assert loras.parse_names("") == ([], [])
    # written here, as limits.py's ranges are (the UI image cannot import the server), and held equal
    from sdxl_server.lora import sources

    assert loras.NAME.pattern == sources.NAME.pattern


@pytest.mark.parametrize(
    ("health", "configured", "offered"),
    [
        (None, ["pixel-art"], ["pixel-art"]),  # the page cannot ask (Vertex AI, or the server still loading)
        ({"status": "ready", "lora": {"preloaded": ["a", "b"]}}, ["pixel-art"], ["a", "b"]),  # the server knows best
        ({"status": "ready"}, ["pixel-art"], []),  # its LoRA is off: nothing to offer, whatever sdxlctl passed
        ({"status": "ready", "lora": {"preloaded": []}}, [], []),
        ({"status": "ready", "lora": {"preloaded": ["Ok", 3, "no way", None]}}, [], ["ok", "3"]),  # garbled
        ({"status": "ready", "lora": "on"}, [], []),
    ],
)
def test_the_names_offered(health: dict[str, Any] | None, configured: list[str], offered: list[str]) -> None:
    assert loras.offered(health, configured) == offered
    assert loras.menu(offered) == [("None", "none"), *((name, name) for name in offered)]


@contextlib.contextmanager
def fake_server(health: dict[str, Any] | None, refusal: dict[str, Any] | None = None) -> Iterator[str]:
    """A model server on loopback: health answers `health` (no health route when None, as behind Vertex AI);
    predict answers `refusal` ({"status", "error"}) or a 64x64 image."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests.servers import serve_app

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 80, 20)).save(buffer, format="JPEG")
    image = base64.b64encode(buffer.getvalue()).decode()

    async def predict(request: Request) -> JSONResponse:
        if refusal is not None:
            return JSONResponse({"error": refusal["error"]}, refusal["status"])
        answer = {"images": [image], "seeds": [5], "output_format": "jpeg", "width": 64, "height": 64}
        return JSONResponse({"predictions": [answer]})

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse(health)

    routes = [Route("/predict", predict, methods=["POST"])]
    if health is not None:
        routes.append(Route("/health", ready))
    with serve_app(Starlette(routes=routes)) as server:
        yield server.url


def test_a_refused_adapter_is_shown_like_any_refusal() -> None:
    # the server's 400 and its 403 (an adapter on a server whose LoRA is off): the request, not the caller
    for status, message in (
        (400, "parameters.lora[0].name: 'ghost' is not preloaded; preloaded: pixel-art"),
        (403, "LoRA sources are not allowed on this server: its operator sets SDXL_LORA_SOURCES"),
    ):
        error = {"code": status, "message": message, "field": "parameters.lora[0].name"}
        with fake_server(None, {"status": status, "error": error}) as url:
            *_, (images, info, _) = generate(HttpBackend(url), Choices("a fox", lora="ghost"), sleep=lambda _: None)
        assert images == [] and info == f"⚠️ The request was refused: {message}"
    # Google refusing the caller still says to check the account
    denied = {"code": 403, "message": "Permission denied on the endpoint", "status": "PERMISSION_DENIED"}
    with fake_server(None, {"status": 403, "error": denied}) as url:
        *_, (_, info, _) = generate(HttpBackend(url), Choices("a fox"), sleep=lambda _: None)
    assert info.startswith("⚠️ Not allowed to call the model (check the service account")


def _menu(url: str) -> tuple[bool, list[Any]]:
    """The adapter menu as the UI process built it: whether its row shows, and its entries."""
    components = httpx.get(f"{url}/config", timeout=10).json()["components"]
    [row] = [c for c in components if c.get("props", {}).get("elem_id") == "lora"]
    [menu] = [c for c in components if c.get("props", {}).get("elem_id") == "lora-menu"]
    return row["props"].get("visible", True) is not False, menu["props"]["choices"]


def test_the_ui_process_offers_what_health_says_else_sdxl_ui_loras(tmp_path: Path) -> None:
    """For a client of the API (which loads no page); the page asks again at each load (test_browser_lora)."""
    configured = {"SDXL_UI_LORAS": "pixel-art, Bad Name!,WaterColor"}
    with fake_server(None) as vertex_like, ui_process(vertex_like, tmp_path, **configured) as url:
        assert _menu(url) == (True, [["None", "none"], ["pixel-art", "pixel-art"], ["watercolor", "watercolor"]])
    log = "".join(path.read_text() for path in tmp_path.glob("ui-*.log"))
    assert log.count("SDXL_UI_LORAS") == 1 and "'Bad Name!'" in log and "Traceback" not in log
    # where it can ask, the server's own list wins over what sdxlctl passed
    health = {"status": "ready", "lora": {"preloaded": ["ink"]}}
    with fake_server(health) as local, ui_process(local, tmp_path, **configured) as url:
        assert _menu(url) == (True, [["None", "none"], ["ink", "ink"]])
