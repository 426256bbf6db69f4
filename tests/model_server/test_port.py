"""Cloud Run tells a container its port in PORT and reaches it on every interface: the server listens where
PORT says when Vertex AI's AIP_HTTP_PORT is unset, and on 0.0.0.0 unless SDXL_HOST says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_server.errors import SettingsError
from sdxl_server.settings import Settings
from tests.model_server.test_dockerfile import instructions
from tests.servers import Server, free_port, server_process


def test_port_is_read_when_aip_http_port_is_unset() -> None:
    assert Settings.from_env({"PORT": "9090"}).http_port == 9090
    assert Settings.from_env({"PORT": "9090", "AIP_HTTP_PORT": ""}).http_port == 9090


def test_aip_http_port_wins_over_port() -> None:
    assert Settings.from_env({"PORT": "9090", "AIP_HTTP_PORT": "7080"}).http_port == 7080
    # Vertex AI's value is used as it is, even beside a PORT that would be refused.
    assert Settings.from_env({"PORT": "nope", "AIP_HTTP_PORT": "7080"}).http_port == 7080


@pytest.mark.parametrize("value", ["http", "0", "-1", "65536", "80.5"])
def test_a_bad_port_is_a_settings_error_naming_port(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"PORT": value})
    assert caught.value.message.startswith(f"PORT={value!r} is invalid")
    assert "AIP_HTTP_PORT" not in caught.value.message


def test_a_bad_aip_http_port_is_still_named_as_itself() -> None:
    with pytest.raises(SettingsError, match=r"^AIP_HTTP_PORT='70000' is invalid: must be from 1 to 65535"):
        Settings.from_env({"AIP_HTTP_PORT": "70000", "PORT": "8080"})


def test_the_container_listens_on_every_interface() -> None:
    # The image sets no SDXL_HOST, so the default (0.0.0.0) holds there: Cloud Run's and Vertex AI's front
    # ends connect from outside the container, and a server on 127.0.0.1 would never pass its startup probe.
    env = " ".join(args for op, args in instructions() if op in {"ENV", "ARG"})
    assert "SDXL_HOST" not in env and "AIP_HTTP_PORT" not in env and "PORT=" not in env
    assert Settings.from_env({"PORT": "8080"}).host == "0.0.0.0"
    assert Settings.from_env({"SDXL_HOST": "127.0.0.1"}).host == "127.0.0.1"


def test_the_server_process_serves_on_port(tmp_path: Path) -> None:
    port = free_port()
    env = {"PORT": str(port), "AIP_HTTP_PORT": "", "SDXL_WARMUP": "none"}
    with server_process(env, tmp_path) as started:
        server = Server(url=f"http://127.0.0.1:{port}", process=started.process, log_path=started.log_path)
        server.wait_until("ready")


def test_the_server_process_refuses_a_bad_port_naming_it(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "AIP_HTTP_PORT"}
    done = subprocess.run(
        [sys.executable, "-m", "sdxl_server"],
        env={**environ, "PORT": "eighty", "SDXL_CACHE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("sdxl_server: PORT='eighty' is invalid")
    assert "Traceback" not in done.stderr
