"""Ctrl-C as a user sends it: a real SIGINT to a real `python -m sdxlctl`, once the test says it got where the
interrupt should land; the command must then end as interrupted (exit 130, no traceback)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def interrupt_sdxlctl(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    ready: Callable[[], bool],
    never: str,
    deadline_s: float = 60,
) -> str:
    """Run `sdxlctl ARGS` (in `cwd`, with `env` over this process's), send SIGINT once `ready()`, and return its
    stderr; it must end as interrupted (130) within 30 s of the signal. `never`: the failure when `ready()` does
    not come within `deadline_s` (or the command ends before it)."""
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1"}
    running = subprocess.Popen(
        [sys.executable, "-m", "sdxlctl", *args], cwd=cwd, env=full, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + deadline_s
        while not ready():
            assert running.poll() is None, running.communicate()[1]
            assert time.monotonic() < deadline, never
            time.sleep(0.05)
        running.send_signal(signal.SIGINT)
        _, stderr = running.communicate(timeout=30)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    assert running.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    return stderr
