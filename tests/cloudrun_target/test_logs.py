"""`sdxlctl logs` on target cloudrun: the model service's entries (with --ui the UI's) from Cloud Logging
(emulated), resource cloud_run_revision by service_name; planted through google-cloud-logging as Cloud Run
writes them (stdout, stderr, the request log)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sdxlctl.state import Resource, StateStore
from tests.cloud.test_logs import _client, _texts
from tests.cloudrun_target.made import deploy, env
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, REGION, Emulator

STDOUT = f"projects/{PROJECT}/logs/run.googleapis.com%2Fstdout"
REQUESTS = f"projects/{PROJECT}/logs/run.googleapis.com%2Frequests"


def _plant(
    emulator: Emulator, text: str, ago: timedelta, *, service: str = "sdxl-server", region: str = REGION
) -> None:
    """One line of a revision's stdout, as Cloud Run writes it."""
    labels = {"service_name": service, "revision_name": f"{service}-00001-abc", "location": region}
    entry: dict[str, Any] = {
        "logName": STDOUT,
        "resource": {"type": "cloud_run_revision", "labels": labels},
        "severity": "INFO",
        "timestamp": (datetime.now(UTC) - ago).isoformat(),
        "jsonPayload": {"message": text},
    }
    _client(emulator).logging_api.write_entries([entry])


def _record(folder: Path, kind: str = "server-service", service: str = "sdxl-server") -> None:
    name = f"projects/{PROJECT}/locations/{REGION}/services/{service}"
    with StateStore(folder / ".sdxlctl").transaction() as state:
        state.put("sdxl", Resource(kind=kind, name=name, target="cloudrun"))


def test_logs_shows_the_model_services_lines_of_every_revision_in_order(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    _record(tmp_path)
    _plant(emulator, "model ready", timedelta(minutes=30))
    _plant(emulator, "starting", timedelta(minutes=31))
    _plant(emulator, "the UI's line", timedelta(minutes=20), service="sdxl-ui")
    _plant(emulator, "another deployment's line", timedelta(minutes=5), service="other-server")
    _plant(emulator, "the same name in another region", timedelta(minutes=5), region="us-central1")
    _plant(emulator, "two days old", timedelta(days=2))
    result = cli("logs", env=env(emulator))
    assert result.code == 0, result.err
    assert _texts(result.out) == ["starting", "model ready"]
    (listed,) = [r for r in emulator.requests() if r["path"] == "/v2/entries:list"]
    query = listed["body"]["filter"]
    assert 'resource.type="cloud_run_revision"' in query and 'resource.labels.service_name="sdxl-server"' in query
    assert "timestamp>=" in query  # never unbounded
    assert _texts(cli("logs", "-n", "1", env=env(emulator)).out) == ["model ready"]


def test_the_uis_log_is_its_service_with_the_request_log(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    _record(tmp_path, "ui-service", "sdxl-ui")
    _plant(emulator, "the model's line", timedelta(minutes=2))
    resource = {"type": "cloud_run_revision", "labels": {"service_name": "sdxl-ui", "location": REGION}}
    request = {"requestMethod": "POST", "status": 200, "requestUrl": "https://sdxl-ui.run.app/"}
    _client(emulator).logging_api.write_entries(
        [{"logName": REQUESTS, "resource": resource, "severity": "INFO", "httpRequest": request}]
    )
    result = cli("logs", "--ui", env=env(emulator))
    assert result.code == 0, result.err
    assert _texts(result.out) == ["POST 200 https://sdxl-ui.run.app/"]


def test_a_folder_without_the_state_file_finds_the_services_by_label(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    deploy(emulator, tmp_path / ".sdxlctl")
    (tmp_path / ".sdxlctl" / "state.json").unlink()
    _plant(emulator, "billing, and found", timedelta(minutes=1))
    _plant(emulator, "the UI, found", timedelta(minutes=1), service="sdxl-ui")
    result = cli("logs", env=env(emulator))
    assert result.code == 0, result.err
    assert _texts(result.out) == ["billing, and found"]
    assert _texts(cli("logs", "--ui", env=env(emulator)).out) == ["the UI, found"]


def test_nothing_deployed_is_one_line_naming_the_label(cli: Cli, emulator: Emulator) -> None:
    result = cli("logs", env=env(emulator))
    assert result.code == 1 and result.out == ""
    assert "no model service of 'sdxl'" in result.err and "sdxlctl-deployment=sdxl" in result.err
    assert "sdxlctl deploy" in result.err and "Traceback" not in result.err
    assert "no UI of 'sdxl'" in cli("logs", "--ui", env=env(emulator)).err
