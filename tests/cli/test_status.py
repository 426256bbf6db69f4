"""`sdxlctl status`: every column filled, readable at 80 columns and when piped, --json unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sdxlctl.cli import render
from sdxlctl.config import Config
from sdxlctl.state import Resource, StateStore
from sdxlctl.steps import ResourceStatus
from tests.conftest import Cli

NAME = "a-rather-long-deployment-name-x"  # 31 characters, near the longest a name may be


def _record(folder: Path) -> None:
    with StateStore(folder / ".sdxlctl").transaction() as state:
        for kind in ("local-server", "local-ui"):
            short = kind.removeprefix("local-")
            url = f"http://127.0.0.1:{9 if short == 'server' else 10}"
            state.put(NAME, Resource(kind=kind, name=f"{NAME}-{short}", target="local", url=url, details={"pid": 0}))


def _check_readable(text: str, width: int) -> None:
    assert "…" not in text and "..." not in text, text  # nothing cut short
    assert max(len(line) for line in text.splitlines()) <= width, text


def _column(table: str, index: int) -> str:
    """The text of one column of a narrow (edgeless) table, its folded lines joined."""
    return "".join(line.split("│")[index].strip() for line in table.splitlines() if "│" in line)


@pytest.mark.parametrize("columns", ["80", "200"])
def test_status_fills_every_column_and_cuts_nothing(cli: Cli, tmp_path: Path, columns: str) -> None:
    _record(tmp_path)
    result = cli("status", env={"SDXLCTL_NAME": NAME, "COLUMNS": columns})
    assert result.code == 0, result.err
    _check_readable(result.out, int(columns))
    header = next(line for line in result.out.splitlines() if "what" in line)
    assert "cost so far" in header and "up for" in header
    rows = [line for line in result.out.splitlines() if line.strip(" │").startswith("local-")]
    assert len(rows) == 2
    for row in rows:
        assert "stopped" in row and row.rstrip(" │").endswith("0.00"), row  # local things cost nothing
    assert ("since" in header) == (columns == "200")  # at 80 columns "up for" says it alone


def test_status_piped_is_as_readable(tmp_path: Path) -> None:
    _record(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_") and k != "COLUMNS"}
    piped = subprocess.run(
        [sys.executable, "-m", "sdxlctl", "status"],
        cwd=tmp_path,
        env={**env, "SDXLCTL_NAME": NAME},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr
    _check_readable(piped.stdout, 80)
    assert _column(piped.stdout, 1) == f"{NAME}-server{NAME}-ui"  # folded over lines, not cut
    assert piped.stdout.count("0.00") == 2


def test_status_json_keeps_every_field(cli: Cli, tmp_path: Path) -> None:
    _record(tmp_path)
    result = cli("status", "--json", env={"SDXLCTL_NAME": NAME, "COLUMNS": "80"})
    rows = json.loads(result.out)["resources"]
    assert {row["kind"] for row in rows} == {"local-server", "local-ui"}
    for row in rows:
        assert row["cost_so_far"] == 0.0 and row["state"] == "stopped" and row["details"] == {"pid": 0}
        assert set(row) >= {"kind", "name", "target", "url", "created_at", "uptime_s", "state", "cost_so_far"}


def test_cloud_rows_fold_long_names_and_show_unknown_cost_as_a_dash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    endpoint = "projects/demo-project/locations/europe-west4/endpoints/1234567890123456789"
    rows = [
        ResourceStatus("endpoint", endpoint, "vertex", f"https://x.googleapis.com/v1/{endpoint}", now, 86400.0,
                       "serving (1 replica, a100)", {}, 88.1234),
        ResourceStatus("ui-service", "sdxl-ui", "vertex", "https://sdxl-ui-abc-ez.a.run.app", now - timedelta(hours=1),
                       3600.0, "recorded", {}, None),
    ]  # fmt: skip
    monkeypatch.setenv("COLUMNS", "80")
    render.status(Config(target="vertex"), rows, as_json=False)
    text = capsys.readouterr().out
    _check_readable(text, 80)
    assert endpoint in _column(text, 1)  # folded over lines, not cut
    assert "88.12" in text and "—" in text
    ui_row = next(line for line in text.splitlines() if "ui-service" in line)
    assert "recorded" in ui_row and ui_row.rstrip(" │").endswith("—")
