"""Ctrl-C says what was interrupted and what still runs or is recorded (Typer alone would exit 130 silently)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sdxlctl.state import Resource, StateStore
from tests.cli.scripted import Answer, scripted_server


def test_ctrl_c_while_waiting_for_images_says_nothing_was_written(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}
    with scripted_server() as script:
        script.answers = [Answer(hang_s=20)]
        url = script.url.removesuffix("/predict")
        with StateStore(tmp_path / ".sdxlctl").transaction() as state:
            state.put("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", url=url, details={}))
        predicting = subprocess.Popen(
            [sys.executable, "-m", "sdxlctl", "predict", "a fox", "-o", "fox.png"],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not script.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert script.seen, "the request never arrived"
        predicting.send_signal(signal.SIGINT)
        _, stderr = predicting.communicate(timeout=30)
    assert predicting.returncode == 130, stderr
    assert "interrupted while waiting for the images; nothing was written" in stderr, stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "fox.png").exists()
