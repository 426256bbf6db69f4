"""The local target end to end: the real model server as a background process, driven by the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from sdxlctl.local import processes as local
from sdxlctl.state import StateStore
from tests.conftest import Cli
from tests.servers import free_port


def server_pid(folder: Path) -> int | None:
    resource = StateStore(folder / ".sdxlctl").read().get("sdxl", "local-server")
    return None if resource is None else int(resource.details["pid"])


def gone(pid: int) -> bool:
    return not local.is_running(pid, "sdxl_server") or local.is_zombie(pid)


def test_deploy_predict_status_teardown(cli: Cli, tmp_path: Path) -> None:
    env = {"SDXLCTL_LOCAL_SERVER_PORT": str(free_port())}
    deployed = cli("deploy", env=env)
    assert deployed.code == 0, deployed.err
    assert "started" in deployed.err
    pid = server_pid(tmp_path)
    assert pid is not None and not gone(pid)
    try:
        status = cli("status", "--json", env=env)
        (row,) = json.loads(status.out)["resources"]
        assert (row["kind"], row["state"], row["details"]["pid"]) == ("local-server", "ready", pid)
        assert "ready" in cli("status", env=env).out

        one = cli(
            "predict",
            "a red fox in snow",
            "-o",
            "fox.png",
            "--steps",
            "3",
            "--seed",
            "9",
            "--width",
            "128",
            "--height",
            "64",
            "--style",
            "cinematic",
            env=env,
        )
        assert one.code == 0, one.err
        assert "fox.png  seed 9" in one.out
        assert "✓ 1 image, 128x64 png" in one.err  # a count as people write it, not "1 image(s)"
        with Image.open(tmp_path / "fox.png") as image:
            assert (image.format, image.size) == ("PNG", (128, 64))

        many = cli("predict", "a fox", "-o", "out/fox.webp", "-n", "3", "--steps", "2", "--json", env=env)
        result = json.loads(many.out)
        assert result["paths"] == ["out/fox.webp", "out/fox-1.webp", "out/fox-2.webp"]
        assert result["seeds"] == [result["seeds"][0] + i for i in range(3)]
        assert all(Image.open(tmp_path / p).format == "WEBP" for p in result["paths"])
        assert many.err == ""  # --json keeps stdout machine-readable and stderr quiet

        again = cli("deploy", env=env)
        assert again.code == 0 and "already running" in again.err and server_pid(tmp_path) == pid
    finally:
        down = cli("teardown", "--yes", env=env)
    assert down.code == 0 and "1 removed, 0 failed" in down.err
    assert gone(pid)
    assert server_pid(tmp_path) is None
    assert "nothing deployed" in cli("status", env=env).err


def test_a_changed_config_restarts_the_server(cli: Cli, tmp_path: Path) -> None:
    port = str(free_port())
    assert cli("deploy", env={"SDXLCTL_LOCAL_SERVER_PORT": port}).code == 0
    first = server_pid(tmp_path)
    assert first is not None
    try:
        changed = cli("deploy", env={"SDXLCTL_LOCAL_SERVER_PORT": port, "SDXLCTL_MODEL_OPTIMIZE": "eager"})
        assert changed.code == 0 and "restarted" in changed.err
        second = server_pid(tmp_path)
        assert second is not None and second != first
        assert gone(first) and not gone(second)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["optimize"] == "eager"
    finally:
        cli("teardown", "--yes")
    assert second is not None and gone(second)


def test_a_model_that_cannot_load_fails_the_deploy_and_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    env = {"SDXLCTL_LOCAL_SERVER_PORT": str(free_port()), "SDXLCTL_MODEL_SOURCE": "nobody/no-such-model"}
    result = cli("deploy", env=env)
    assert result.code == 1
    assert "did not start" in result.err and "Hugging Face Hub" in result.err
    assert server_pid(tmp_path) is None
    assert "Traceback" not in result.err


def test_a_busy_port_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("deploy", env={"SDXLCTL_LOCAL_SERVER_PORT": str(port)})
    assert result.code == 1 and f"port {port} is already in use" in result.err
    assert "[local] server_port" in result.err and "SDXLCTL_LOCAL_SERVER_PORT" in result.err
    assert server_pid(tmp_path) is None


def test_a_busy_ui_port_names_the_ui_port_key(tmp_path: Path) -> None:
    from sdxlctl.config import Config
    from sdxlctl.errors import DeployError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = local.ui_spec(Config.model_validate({"local": {"ui_port": port}}), "http://127.0.0.1:1")
        with pytest.raises(DeployError) as raised:
            local.start(spec, tmp_path / "ui.log")
    refused = f"{raised.value.message} {raised.value.hint}"
    assert f"port {port} is already in use" in refused and not (tmp_path / "ui.log").exists()
    assert "[local] ui_port" in refused and "SDXLCTL_LOCAL_UI_PORT" in refused and "SERVER" not in refused


def test_teardown_asks_unless_yes(cli: Cli, tmp_path: Path) -> None:
    assert cli("deploy", env={"SDXLCTL_LOCAL_SERVER_PORT": str(free_port())}).code == 0
    pid = server_pid(tmp_path)
    assert pid is not None
    refused = cli("teardown")  # stdin is not a terminal under pytest
    assert refused.code == 2 and "--yes" in refused.err
    assert not gone(pid)
    assert cli("teardown", "-y").code == 0 and gone(pid)


def test_ctrl_c_during_deploy_leaves_consistent_state_and_a_rerun_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "SDXLCTL_LOCAL_SERVER_PORT": str(free_port()), "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "sdxlctl"]
    deploying = subprocess.Popen([*cli, "deploy"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while server_pid(tmp_path) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = server_pid(tmp_path)
    assert pid is not None
    deploying.send_signal(signal.SIGINT)
    _, stderr = deploying.communicate(timeout=30)
    try:
        assert deploying.returncode == 130, stderr
        assert "Traceback" not in stderr
        # SkyPilot-style: what was interrupted, what still runs, and how to go on or stop it.
        assert "interrupted while waiting for the model server" in stderr, stderr
        assert f"pid {pid}" in stderr and "sdxlctl deploy" in stderr and "sdxlctl teardown" in stderr
        assert server_pid(tmp_path) == pid and not gone(pid)  # recorded and still loading: nothing lost

        resumed = subprocess.run([*cli, "deploy"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert server_pid(tmp_path) == pid  # the same server, not a second one
    finally:
        down = subprocess.run(
            [*cli, "teardown", "--yes"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
    assert down.returncode == 0, down.stderr
    assert gone(pid)
