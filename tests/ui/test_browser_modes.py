"""The generation modes in a real headless Chromium: a tab each for image to image and inpainting (a brush
paints the mask), the sampler menu and the refiner's controls. The UI process talks to the real tiny model
server through a pass-through that keeps the bodies it sent, so each test sees the request and the image."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.servers import Server
from tests.ui.conftest import recording_proxy, ui_process

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def page_at(
    plain_server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """One UI process for the module (its start is most of a test's time), and the bodies it sent."""
    tmp = tmp_path_factory.mktemp("ui-modes")
    with recording_proxy(plain_server.url) as (proxy, bodies), ui_process(proxy, tmp) as url:
        yield url, bodies


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A 100x76 PNG (not a multiple of 8: the page makes it one): a gradient, so resizing shows."""
    image = Image.new("RGB", (100, 76))
    image.putdata([(x * 2, y * 3, 128) for y in range(76) for x in range(100)])
    path = tmp_path / "photo.png"
    image.save(path)
    return path


def _decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _generate_and_wait(page: Any, bodies: list[dict[str, Any]], *, refused: bool = False) -> dict[str, Any]:
    """Click Generate, wait for a new image and its seed line (or, `refused`, for the page's warning instead);
    the body the page sent."""
    sent = len(bodies)
    before = page.evaluate("document.querySelector('#gallery img')?.getAttribute('src') ?? ''")
    page.locator("#generate").click()
    page.wait_for_function(
        """before => document.querySelector('#info').innerText.includes('⚠️') || (
            document.querySelector('#info').innerText.includes('Seed') &&
            (document.querySelector('#gallery img')?.getAttribute('src') ?? before) !== before)""",
        arg=before,
        timeout=TIMEOUT_MS,
    )
    info = page.locator("#info").inner_text()
    assert ("⚠️" in info) == refused, info
    assert len(bodies) == sent + 1
    return bodies[-1]


def test_image_to_image_uploads_an_image_and_gets_one_back(
    browser: Any, page_at: tuple[str, list[dict[str, Any]]], photo: Path
) -> None:
    url, bodies = page_at
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(url)
    page.locator("#prompt textarea").fill("a watercolour of the same")
    page.get_by_role("tab", name="Image to image").click()
    page.locator("#init-image input[type=file]").set_input_files(str(photo))
    page.locator("#init-image img").first.wait_for(timeout=TIMEOUT_MS)
    body = _generate_and_wait(page, bodies)
    instance, parameters = body["instances"][0], body["parameters"]
    assert _decoded(instance["image"]).size == (96, 72) == (parameters["width"], parameters["height"])
    assert parameters["strength"] == 0.8 and "mask_image" not in instance
    info = page.locator("#info").inner_text()
    assert "96x72" in info and "resized from 100x76 to 96x72" in info
    page.close()


def test_inpainting_paints_a_mask_with_the_brush_and_gets_an_image_back(
    browser: Any, page_at: tuple[str, list[dict[str, Any]]], photo: Path
) -> None:
    url, bodies = page_at
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(url)
    page.locator("#prompt textarea").fill("a red ball")
    page.get_by_role("tab", name="Inpainting").click()  # the page shows the editor once the tab is laid out
    page.locator("#inpaint-editor input[type=file]").wait_for(state="attached", timeout=TIMEOUT_MS)
    page.wait_for_timeout(1000)  # the editor sets up its canvas before it takes an upload
    page.locator("#inpaint-editor input[type=file]").set_input_files(str(photo))
    page.locator('#inpaint-editor button[aria-label="Pan"]').wait_for(timeout=TIMEOUT_MS)  # the image is in
    # whole and centered once the editor has zoomed it to fit: the image at 30% and 70% of the editor's
    # width (the photo is 4:3 in a wide box), where a first mount of 0 width drew it from the middle on
    for _ in range(40):
        with Image.open(io.BytesIO(page.locator("#inpaint-editor").screenshot())) as shot:
            width, height = shot.size
            colours: list[Any] = [shot.convert("RGB").getpixel((int(width * f), height // 2)) for f in (0.3, 0.7)]
        if all(abs(blue - 128) < 16 and red < 230 for red, _, blue in colours):
            break
        page.wait_for_timeout(250)
    else:
        raise AssertionError(f"the image is not centered in the editor: {colours} at 30% and 70%")
    box = page.locator("#inpaint-editor").bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # a stroke across the middle
    page.mouse.move(x - 30, y)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(x - 30 + 6 * step, y, steps=2)
    page.mouse.up()
    body = _generate_and_wait(page, bodies)
    instance, parameters = body["instances"][0], body["parameters"]
    image, mask = _decoded(instance["image"]), _decoded(instance["mask_image"])
    assert image.size == mask.size == (96, 72) == (parameters["width"], parameters["height"])
    assert mask.mode == "L" and set(mask.getdata()) == {0, 255}  # painted and not: both there
    bbox = mask.getbbox()
    assert bbox is not None
    left, top, right, bottom = bbox
    assert left > 0 and right < 96 and top > 0 and bottom < 72  # a stroke, not the whole image
    assert parameters["strength"] == 1.0
    page.close()


def test_the_sampler_menu_changes_the_request_and_the_image(
    browser: Any, page_at: tuple[str, list[dict[str, Any]]]
) -> None:
    url, bodies = page_at
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(url)
    page.locator("#prompt textarea").fill("a lighthouse")
    page.get_by_text("Advanced").click()
    page.get_by_label("Randomize seed").uncheck()
    page.get_by_role("spinbutton", name="Seed").fill("11")
    euler = _generate_and_wait(page, bodies)
    first = page.locator("#gallery img").first.get_attribute("src")
    page.locator("#sampler input").click()
    page.get_by_role("option", name="DPM++ 2M Karras").click()
    other = _generate_and_wait(page, bodies)
    page.wait_for_function(
        f"document.querySelector('#gallery img').getAttribute('src') !== {first!r}", timeout=TIMEOUT_MS
    )
    assert euler["parameters"]["scheduler"] == "euler" and other["parameters"]["scheduler"] == "dpmpp_2m_karras"
    assert euler["instances"][0]["seed"] == other["instances"][0]["seed"] == 11
    images = [page.request.get(page.locator("#gallery img").first.get_attribute("src")).body()]
    images.append(page.request.get(first).body())
    assert Image.open(io.BytesIO(images[0])).tobytes() != Image.open(io.BytesIO(images[1])).tobytes()
    page.close()


def test_the_refiner_controls_are_hidden_without_a_refiner(
    browser: Any, page_at: tuple[str, list[dict[str, Any]]]
) -> None:
    url, _ = page_at
    page = browser.new_page()
    page.goto(url)
    page.get_by_text("Advanced").click()
    page.get_by_label("number input for Steps").wait_for(timeout=TIMEOUT_MS)
    assert (
        page.get_by_text("High noise fraction").count() == 0 or not page.get_by_text("High noise fraction").is_visible()
    )
    assert not page.locator("#refiner").is_visible()
    assert not page.locator("#lora").is_visible()  # and no adapter menu: the server preloads none
    page.close()


def test_with_a_refiner_the_page_offers_it_and_the_request_uses_it(browser: Any, tmp_path: Path) -> None:
    from tests.servers import server_process

    env = {"SDXL_MODEL": "tiny", "SDXL_REFINER": "tiny", "SDXL_WARMUP": "64x64"}
    with server_process(env, tmp_path) as server:
        server.wait_until("ready")
        with recording_proxy(server.url) as (proxy, bodies), ui_process(proxy, tmp_path) as url:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(url)
            page.locator("#prompt textarea").fill("a lighthouse")
            page.get_by_text("Advanced").click()
            page.locator("#refiner").wait_for(timeout=TIMEOUT_MS)  # shown: the server's health names a refiner
            page.get_by_label("Expert ensemble (text to image)").check()
            body = _generate_and_wait(page, bodies)
            page.close()
    assert body["parameters"]["refine"] == "expert_ensemble" and body["parameters"]["high_noise_frac"] == 0.8


def test_a_photo_with_exif_orientation_is_sent_upright_from_both_tabs(
    browser: Any, page_at: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """A phone photo stored sideways (EXIF orientation 6) is shown upright by the browser; the page sends it
    upright and without the tag (the server would turn a tagged one again), the mask painted on it the same."""
    url, bodies = page_at
    stored = Image.new("RGB", (100, 76))
    stored.putdata([(x * 2, y * 3, 128) for y in range(76) for x in range(100)])
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(url)
    page.locator("#prompt textarea").fill("the same, upright")
    page.get_by_role("tab", name="Image to image").click()
    page.locator("#init-image input[type=file]").set_input_files(str(path))
    page.locator("#init-image img").first.wait_for(timeout=TIMEOUT_MS)
    sent = _decoded(_generate_and_wait(page, bodies)["instances"][0]["image"])
    assert sent.size == (72, 96) and sent.getexif().get(0x0112) is None  # 76x100 upright, in multiples of 8
    page.get_by_role("tab", name="Inpainting").click()
    page.locator("#inpaint-editor input[type=file]").wait_for(state="attached", timeout=TIMEOUT_MS)
    page.wait_for_timeout(1000)  # the editor sets up its canvas before it takes an upload
    page.locator("#inpaint-editor input[type=file]").set_input_files(str(path))
    page.locator('#inpaint-editor button[aria-label="Pan"]').wait_for(timeout=TIMEOUT_MS)
    page.wait_for_timeout(1000)  # zoomed to fit
    box = page.locator("#inpaint-editor").bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 10, y)
    page.mouse.down()
    page.mouse.move(x + 10, y, steps=5)
    page.mouse.up()
    instance = _generate_and_wait(page, bodies)["instances"][0]
    image, mask = _decoded(instance["image"]), _decoded(instance["mask_image"])
    assert image.size == mask.size == (72, 96) and image.getexif().get(0x0112) is None
    page.close()
