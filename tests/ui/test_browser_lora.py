"""The LoRA adapter menu in a real headless Chromium: a real model server that preloads a tiny adapter (made
with peft, tests/model_server/loras.py), the page that offers it from the server's health, and the image it
changes; and, where the page cannot ask health (Vertex AI), the names sdxlctl passes and the server's refusal."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from tests.servers import Server
from tests.ui.conftest import recording_proxy, ui_process
from tests.ui.test_browser_modes import _generate_and_wait

TIMEOUT_MS = 60_000


def _image(page: Any) -> bytes:
    """The bytes of the image the gallery shows."""
    return page.request.get(page.locator("#gallery img").first.get_attribute("src")).body()


def _entries(page: Any) -> list[str]:
    """The menu's entries, as it shows them open."""
    page.locator("#lora-menu input").click()
    page.get_by_role("option").first.wait_for(timeout=TIMEOUT_MS)
    # an entry's text is its label, after a check mark on the chosen one
    return [option.inner_text().split("\n")[-1].strip() for option in page.get_by_role("option").all()]


def _choose(page: Any, name: str) -> None:
    """Pick `name` in the menu, opening it unless it is open."""
    if page.get_by_role("option").count() == 0:
        page.locator("#lora-menu input").click()
    page.get_by_role("option", name=name, exact=True).click()


def _open_advanced(page: Any, url: str, prompt: str) -> None:
    page.goto(url)
    page.locator("#prompt textarea").fill(prompt)
    page.get_by_text("Advanced").click()
    page.get_by_label("Randomize seed").uncheck()
    page.get_by_role("spinbutton", name="Seed").fill("11")


def test_an_adapter_the_server_preloads_is_offered_and_changes_the_image(browser: Any, tmp_path: Path) -> None:
    from tests.model_server.loras import tiny_lora
    from tests.servers import server_process

    adapter = tiny_lora(tmp_path / "pixel-art", seed=3)
    env = {"SDXL_MODEL": "tiny", "SDXL_WARMUP": "64x64", "SDXL_LORAS": f"pixel-art={adapter}"}
    with server_process(env, tmp_path) as server:
        server.wait_until("ready")
        with recording_proxy(server.url) as (proxy, bodies), ui_process(proxy, tmp_path) as url:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            _open_advanced(page, url, "a lighthouse")
            page.locator("#lora").wait_for(timeout=TIMEOUT_MS)  # shown: the server's health names an adapter
            assert _entries(page) == ["None", "pixel-art"]
            plain, plain_image = _generate_and_wait(page, bodies), _image(page)
            _choose(page, "pixel-art")
            page.get_by_label("number input for LoRA scale").fill("0.8")
            page.get_by_label("number input for LoRA scale").press("Enter")
            adapted, adapted_image = _generate_and_wait(page, bodies), _image(page)
            assert "Seed 11" in page.locator("#info").inner_text()
            page.close()
    assert "lora" not in plain["parameters"]
    assert adapted["parameters"]["lora"] == [{"name": "pixel-art", "scale": 0.8}]
    assert adapted["instances"] == plain["instances"]  # the same prompt and seed 11: only the adapter differs
    assert plain_image and adapted_image
    with Image.open(io.BytesIO(plain_image)) as one, Image.open(io.BytesIO(adapted_image)) as other:
        assert one.size == other.size == (128, 128) and one.tobytes() != other.tobytes()


def test_where_health_cannot_be_asked_the_names_come_from_sdxlctl_and_a_refusal_is_shown(
    browser: Any, plain_server: Server, tmp_path: Path
) -> None:
    """Behind Vertex AI (predict only) the page offers SDXL_UI_LORAS; a server without that adapter (here:
    without LoRA at all, as when the config changed after the deployment) refuses it, and the page says so."""
    with (
        recording_proxy(plain_server.url, health=False) as (proxy, bodies),
        ui_process(proxy, tmp_path, SDXL_UI_LORAS="Pixel-Art,not a name") as url,
    ):
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        _open_advanced(page, url, "a lighthouse")
        page.locator("#lora").wait_for(timeout=TIMEOUT_MS)
        assert _entries(page) == ["None", "pixel-art"]
        _choose(page, "pixel-art")
        body = _generate_and_wait(page, bodies, refused=True)
        info = page.locator("#info").inner_text()
        page.close()
    assert body["parameters"]["lora"] == [{"name": "pixel-art", "scale": 1.0}]
    assert info.startswith("⚠️ The request was refused: ") and "SDXL_LORA_SOURCES" in info, info
    assert "service account" not in info and "Traceback" not in info
