"""The page in a real headless Chromium, against the UI process and a real model server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from tests.servers import ROOT, Server, free_port
from tests.ui.conftest import ui_process

TIMEOUT_MS = 60_000


def test_type_a_prompt_generate_and_see_the_image_and_seed(browser: Any, plain_server: Server, tmp_path: Path) -> None:
    with ui_process(plain_server.url, tmp_path) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(url)
        page.locator("#prompt textarea").fill("a red fox in the snow, golden hour")
        page.locator("#prompt textarea").press("Enter")  # Enter submits
        page.locator("#gallery img").first.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_function("document.querySelector('#info').innerText.includes('Seed')", timeout=TIMEOUT_MS)
        assert "128x128" in page.locator("#info").inner_text()

        # A fixed seed, from the Advanced section, with the button
        page.get_by_text("Advanced").click()
        page.get_by_label("Randomize seed").uncheck()
        page.get_by_role("spinbutton", name="Seed").fill("42")
        page.locator("#generate").click()
        page.wait_for_function("document.querySelector('#info').innerText.includes('Seed 42')", timeout=TIMEOUT_MS)
        page.locator("#gallery img").first.wait_for(timeout=TIMEOUT_MS)

        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        with Image.open(shot) as image:
            assert image.size[0] >= 1000 and len(set(image.convert("L").getdata())) > 50
        if os.environ.get("UPDATE_SCREENSHOTS"):  # kept in the repository as docs/ui.png
            shutil.copy(shot, ROOT / "docs" / "ui.png")
        page.close()


def test_with_the_server_stopped_the_page_says_so(browser: Any, tmp_path: Path) -> None:
    nothing = f"http://127.0.0.1:{free_port()}"
    with ui_process(nothing, tmp_path) as url:
        page = browser.new_page()
        page.goto(url)
        page.locator("#prompt textarea").fill("a red fox")
        page.locator("#generate").click()
        page.wait_for_function("document.querySelector('#info').innerText.includes('⚠️')", timeout=TIMEOUT_MS)
        message = page.locator("#info").inner_text()
        assert "Cannot reach the model server" in message and nothing in message
        assert "Traceback" not in page.content()
        assert page.locator("#gallery img").count() == 0
        page.close()


# The part of each gallery image a person can see: its picture as object-fit draws it, and its box cut by
# every scrolling or clipping ancestor and by the window.
MEASURE_IMAGES = """() => [...document.querySelectorAll('#gallery img')].map(img => {
    const box = img.getBoundingClientRect(), fit = getComputedStyle(img).objectFit;
    const [nw, nh] = [img.naturalWidth, img.naturalHeight];
    const scale = {contain: Math.min(box.width / nw, box.height / nh),
                   'scale-down': Math.min(1, box.width / nw, box.height / nh),
                   none: 1, cover: Math.max(box.width / nw, box.height / nh)}[fit];
    const [w, h] = scale === undefined ? [box.width, box.height] : [nw * scale, nh * scale];
    const drawn = {left: box.left + (box.width - w) / 2, top: box.top + (box.height - h) / 2};
    Object.assign(drawn, {right: drawn.left + w, bottom: drawn.top + h, width: w, height: h});
    let seen = {left: 0, top: 0, right: innerWidth, bottom: innerHeight};
    for (let node = img; node; node = node.parentElement) {
        const style = getComputedStyle(node);
        if (node === img || style.overflowX !== 'visible' || style.overflowY !== 'visible') {
            const r = node.getBoundingClientRect();
            seen = {left: Math.max(seen.left, r.left), top: Math.max(seen.top, r.top),
                    right: Math.min(seen.right, r.right), bottom: Math.min(seen.bottom, r.bottom)};
        }
    }
    return {drawn, seen, natural: [nw, nh]};
})"""


def _measure(page: Any, count: int) -> list[dict[str, Any]]:
    try:
        page.wait_for_function(f"document.querySelectorAll('#gallery img').length === {count}", timeout=TIMEOUT_MS)
    except Exception as exc:  # a timeout under load (seen once in CI): say what the page showed instead
        shown = page.evaluate("document.querySelectorAll('#gallery img').length")
        info = page.evaluate("document.querySelector('#info')?.innerText")
        raise AssertionError(f"waited for {count} images; the gallery shows {shown}, the page says {info!r}") from exc
    page.wait_for_function(
        "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth)", timeout=TIMEOUT_MS
    )
    images: list[dict[str, Any]] = page.evaluate(MEASURE_IMAGES)
    for image in images:
        drawn, seen, (width, height) = image["drawn"], image["seen"], image["natural"]
        # whole: nothing of the picture is cut off, by its box, the gallery's scroll area or the window
        assert seen["left"] <= drawn["left"] + 1 and drawn["right"] <= seen["right"] + 1, image
        assert seen["top"] <= drawn["top"] + 1 and drawn["bottom"] <= seen["bottom"] + 1, image
        assert abs(drawn["width"] / drawn["height"] - width / height) < 0.02, image  # at its own aspect
    return images


# Resolves after two animation frames: Svelte has applied what an input changed.
NEXT_FRAMES = "new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"


def _set_images(page: Any, count: int) -> None:
    """Type `count` into the Images box, as a person would, until the page keeps it.

    Typed right after a generation, the box sometimes went back to 1 by itself a moment later (Gradio's slider
    syncing to its old value), and Generate sent 1 image: seen in CI since stop 23, reproduced here 2 runs in 5
    by logging the page's queue/join request and the box's value at the click. A person sees the 1 and types
    again; so does this."""
    box = page.get_by_label("number input for Images")
    for _ in range(5):
        box.fill(str(count))
        box.press("Enter")
        page.locator("#prompt textarea").click()  # the Advanced section stays open below the gallery
        page.evaluate(NEXT_FRAMES)
        if box.input_value() == str(count):
            return
    raise AssertionError(f"the Images box would not keep {count}: it shows {box.input_value()}")


def test_one_image_fills_the_gallery_and_four_are_a_grid_without_scrolling(
    browser: Any, plain_server: Server, tmp_path: Path
) -> None:
    with ui_process(plain_server.url, tmp_path) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.locator("#prompt textarea").fill("a red fox")
        page.locator("#generate").click()
        [one] = _measure(page, 1)
        wrap = page.locator("#gallery .grid-wrap").bounding_box()
        # not a thumbnail in a corner: as tall as the gallery (a square picture in a wide gallery)
        assert one["drawn"]["height"] >= 0.9 * wrap["height"] and wrap["height"] >= 400, (one, wrap)

        page.get_by_text("Advanced").click()
        _set_images(page, 4)
        page.locator("#generate").click()
        four = _measure(page, 4)
        assert (
            len({round(i["drawn"]["left"]) for i in four}) == 2 and len({round(i["drawn"]["top"]) for i in four}) == 2
        )
        assert all(i["drawn"]["height"] >= 200 for i in four), four
        page.screenshot(path=str(tmp_path / "four.png"))
        page.close()


def test_a_busy_model_is_retried_and_the_page_says_so(browser: Any, tmp_path: Path) -> None:
    from tests.ui.conftest import flaky_server

    # and with max_images = 1 the page has no Images slider to offer (one value is no range)
    with flaky_server((429, "2")) as (server, asked), ui_process(server, tmp_path, SDXL_UI_MAX_IMAGES="1") as url:
        page = browser.new_page()
        page.goto(url)
        page.locator("#prompt textarea").fill("a red fox")
        page.locator("#generate").click()
        page.wait_for_function(
            "document.querySelector('#info').innerText.includes('busy, retrying in 2 s')", timeout=TIMEOUT_MS
        )
        page.wait_for_function("document.querySelector('#info').innerText.includes('Seed 5')", timeout=TIMEOUT_MS)
        page.locator("#gallery img").first.wait_for(timeout=TIMEOUT_MS)
        assert len(asked) == 2
        page.get_by_text("Advanced").click()
        page.get_by_label("number input for Steps").wait_for(timeout=TIMEOUT_MS)
        assert page.get_by_label("number input for Images").count() == 0
        page.close()
