"""`sdxlctl status` on vertex finds by label what this folder's state file does not know (as teardown does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdxlctl.state import StateStore
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, Emulator

UNRECORDED = "not in this folder's state: found by its label"


def _up(cli: Cli, env: dict[str, str], *steps: str) -> None:
    for step in steps:
        result = cli(step, env=env)
        assert result.code == 0, (step, result.err)


def _rows(cli: Cli, env: dict[str, str]) -> list[dict]:
    result = cli("status", "--json", env=env)
    assert result.code == 0, result.err
    return list(json.loads(result.out)["resources"])


def test_status_in_a_new_folder_lists_the_billing_endpoint_by_its_label(
    cli: Cli, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = emulator.env()
    _up(cli, env, "build", "upload", "deploy")  # folder A
    (endpoint,) = emulator.resources()["endpoints"]
    (model,) = emulator.resources()["models"]
    folder_b = tmp_path / "b"
    folder_b.mkdir()
    monkeypatch.chdir(folder_b)  # the same config (from the environment), no state file

    before = len(emulator.requests())
    result = cli("status", env=env)
    assert result.code == 0, result.err
    assert [r for r in emulator.requests()[before:] if r["method"] != "GET"] == []  # status only looks
    assert "nothing deployed" not in result.err
    assert endpoint["name"].rsplit("/", 1)[-1] in result.out and "serving 1 model" in result.out
    assert "not in this folder's state" in result.out and "sdxlctl teardown" in result.err

    rows = {row["kind"]: row for row in _rows(cli, env)}
    assert set(rows) == {"endpoint", "model", "server-account"}
    assert all(not row["recorded"] for row in rows.values())
    assert rows["endpoint"]["name"] == endpoint["name"]
    assert rows["endpoint"]["state"] == f"serving 1 model ({UNRECORDED})"
    assert rows["endpoint"]["cost_so_far"] is not None  # it bills: its GPU and start come from the listing
    assert rows["model"]["name"] == model["name"]
    assert rows["server-account"]["name"] == endpoint["deployedModels"][0]["serviceAccount"]
    assert StateStore(folder_b / ".sdxlctl").read().of("sdxl") == {}  # and records nothing


def test_status_in_the_deploying_folder_marks_nothing_and_adds_nothing(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    _up(cli, env, "build", "upload", "deploy")
    rows = _rows(cli, env)
    assert [row["kind"] for row in rows if not row["recorded"]] == []
    assert sorted(row["kind"] for row in rows) == ["endpoint", "model", "server-account", "server-image"]


def test_the_hint_is_true_the_steps_in_the_new_folder_adopt_what_exists(
    cli: Cli, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = emulator.env()
    _up(cli, env, "build", "upload", "deploy")
    before = emulator.resources()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    _up(cli, env, "build", "upload", "deploy")
    after = emulator.resources()
    assert [e["name"] for e in after["endpoints"]] == [e["name"] for e in before["endpoints"]]
    assert [m["name"] for m in after["models"]] == [m["name"] for m in before["models"]]
    assert all(row["recorded"] for row in _rows(cli, env))


def test_a_ui_found_by_label_is_listed_with_its_account_and_teardown_removes_all(
    cli: Cli, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = emulator.env()
    _up(cli, env, "build", "upload", "deploy", "ui-deploy")
    (service,) = emulator.resources()["services"]
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    rows = {row["kind"]: row for row in _rows(cli, env)}
    assert {"endpoint", "model", "ui-service", "ui-account", "server-account"} <= set(rows)
    assert rows["ui-service"]["name"] == service["name"] and rows["ui-service"]["url"] == service["uri"]
    assert rows["ui-service"]["state"].startswith("ready (")
    down = cli("teardown", "--yes", env=env)  # what the hint says removes them
    assert down.code == 0, down.err
    assert _rows(cli, env) == [] and emulator.labelled() == []
    assert "nothing deployed" in cli("status", env=env).err


def test_status_piped_at_80_columns_marks_the_unrecorded_endpoint_whole(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    env = emulator.env()
    _up(cli, env, "build", "upload", "deploy")
    (endpoint,) = emulator.resources()["endpoints"]
    (tmp_path / "b").mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_") and k != "COLUMNS"}
    piped = subprocess.run(
        [sys.executable, "-m", "sdxlctl", "status"],
        cwd=tmp_path / "b",
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    assert max(len(line) for line in piped.stdout.splitlines()) <= 80, piped.stdout
    folded = "".join(line.split("│")[1].strip() for line in piped.stdout.splitlines() if "│" in line)
    assert endpoint["name"] in folded  # folded over lines, never cut
    state = "".join(line.split("│")[2].strip() for line in piped.stdout.splitlines() if "│" in line)
    assert UNRECORDED.replace(" ", "") in state.replace(" ", "")
    assert "sdxlctl teardown" in piped.stderr and "Traceback" not in piped.stderr


def test_status_offline_is_one_clear_line(cli: Cli) -> None:
    """The label search needs Google: unreachable, status says so in one line and its hint."""
    import socket

    with socket.socket() as closed:  # a port nothing listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        env = {
            "SDXLCTL_TARGET": "vertex",
            "SDXLCTL_GCP_PROJECT": PROJECT,
            "SDXLCTL_GCP_API_ENDPOINT": f"http://127.0.0.1:{port}",
            "SDXLCTL_GCP_RETRY_S": "0.2",
        }
        result = cli("status", env=env)
    assert result.code == 1, result
    assert "Traceback" not in result.err and result.out == ""
    error, hint = [line for line in result.err.splitlines() if line.strip()]
    assert error.startswith("error: list ") and "gave up after retrying" in error, result.err
    assert hint.startswith("hint: ") and "retry_s" in hint
