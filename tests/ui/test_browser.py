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
