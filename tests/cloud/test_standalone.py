"""The emulator on its own (`python -m tests.emulator`), and the lifecycle from a shell, command by command."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.servers import ROOT, free_port

CONFIG = """\
name = "fox"
target = "vertex"

[gcp]
project = "rehearsal"
region = "us-central1"
api_endpoint = "http://127.0.0.1:{port}"
poll_interval_s = 0.1

[model]
source = "tiny"
"""


def test_the_lifecycle_from_a_shell_against_the_standalone_emulator(tmp_path: Path) -> None:
    port, gcs_port = free_port(), free_port()
    emulator = subprocess.Popen(
        [sys.executable, "-m", "tests.emulator", "--port", str(port), "--gcs-port", str(gcs_port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/_emulator/resources", timeout=1).status_code == 200:
                    break
            assert emulator.poll() is None and time.monotonic() < deadline, "the emulator did not start"
            time.sleep(0.1)
        (tmp_path / "sdxlctl.toml").write_text(CONFIG.format(port=port))
        env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{gcs_port}", "HF_HUB_OFFLINE": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("SDXLCTL_")}

        def sdxlctl(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run(
                [sys.executable, "-m", "sdxlctl", *args],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert done.returncode == 0, (args, done.stderr)
            return done

        sdxlctl("build")
        sdxlctl("upload")
        sdxlctl("deploy", "--gpu", "a100")
        sdxlctl("predict", "a fox", "-o", "fox.png", "--steps", "2", "--width", "64", "--height", "64")
        assert (tmp_path / "fox.png").stat().st_size > 0
        sdxlctl("ui-deploy", "--public")
        status = json.loads(sdxlctl("status", "--json").stdout)
        assert {r["kind"] for r in status["resources"]} >= {"model", "endpoint", "ui-service"}
        sdxlctl("teardown", "--yes")
        left = httpx.get(f"http://127.0.0.1:{port}/_emulator/resources").json()
        assert [r for table in left.values() for r in table if r.get("labels", {}).get("sdxlctl-deployment")] == []
    finally:
        os.killpg(emulator.pid, signal.SIGTERM)
        emulator.wait(timeout=30)
