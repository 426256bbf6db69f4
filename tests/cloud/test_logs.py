"""`sdxlctl logs` on target vertex: the endpoint's container entries from Cloud Logging (emulated), read
through google-cloud-logging; planted by the tests through the same library, as Vertex AI writes them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sdxlctl.config import load_config
from sdxlctl.state import Resource, StateStore
from sdxlctl.steps import LogRequest
from sdxlctl.vertex.logs import logs as vertex_logs
from tests.conftest import Cli
from tests.emulator.app import create_app
from tests.emulator.core import World
from tests.emulator.model_servers import ModelServers, Replica
from tests.emulator_fixtures import PROJECT, REGION, Emulator
from tests.servers import serve_app

OURS, THEIRS = "1111", "2222"
CONTAINER_LOG = "aiplatform.googleapis.com%2Fprediction_container"


@pytest.fixture
def servers(tmp_path: Path) -> ModelServers:
    return ModelServers(log_dir=tmp_path)


@pytest.fixture
def cloud(servers: ModelServers) -> Iterator[Emulator]:
    """The emulator alone: no model server process, no GCS (logs reads neither)."""
    world = World()
    with serve_app(create_app(world, servers=servers)) as server:
        yield Emulator(server.url, "", world)


def _client(emulator: Emulator) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import logging as cloud_logging

    return cloud_logging.Client(
        project=PROJECT,
        credentials=AnonymousCredentials(),
        _use_grpc=False,
        client_options={"api_endpoint": emulator.url},
    )


def _plant(emulator: Emulator, text: str, ago: timedelta, *, endpoint: str = OURS, insert_id: str = "") -> None:
    """One line of a deployed model's stdout, as Vertex AI's container logging writes it."""
    labels = {"endpoint_id": endpoint, "location": REGION, "resource_container": "123456789012"}
    _write(
        emulator,
        {
            "logName": f"projects/{PROJECT}/logs/{CONTAINER_LOG}",
            "resource": {"type": "aiplatform.googleapis.com/Endpoint", "labels": labels},
            "severity": "INFO",
            "timestamp": (datetime.now(UTC) - ago).isoformat(),
            "jsonPayload": {"message": text},
            **({"insertId": insert_id} if insert_id else {}),
        },
    )


def _write(emulator: Emulator, entry: dict[str, Any]) -> None:
    # The library's API call itself: Logger.log_* would also write its one-off diagnostic entry.
    _client(emulator).logging_api.write_entries([entry])


def _record_endpoint(folder: Path, endpoint_id: str = OURS) -> None:
    name = f"projects/{PROJECT}/locations/{REGION}/endpoints/{endpoint_id}"
    with StateStore(folder / ".sdxlctl").transaction() as state:
        state.put("sdxl", Resource(kind="endpoint", name=name, target="vertex"))


def _texts(out: str) -> list[str]:
    """The messages of `sdxlctl logs` lines: TIME SEVERITY MESSAGE."""
    return [line.split(None, 2)[2] for line in out.splitlines()]


def test_logs_shows_the_endpoints_container_lines_of_the_last_day_in_order(
    cli: Cli, cloud: Emulator, tmp_path: Path
) -> None:
    _record_endpoint(tmp_path)
    _plant(cloud, "model ready", timedelta(minutes=30))
    _plant(cloud, "starting", timedelta(minutes=31))
    _plant(cloud, "another deployment's line", timedelta(minutes=5), endpoint=THEIRS)
    _plant(cloud, "two days old", timedelta(days=2))
    result = cli("logs", env=cloud.env())
    assert result.code == 0, result.err
    assert _texts(result.out) == ["starting", "model ready"]
    assert all(" INFO " in line and line[:4].isdigit() for line in result.out.splitlines())
    (listed,) = [r for r in cloud.requests() if r["path"] == "/v2/entries:list"]
    query = listed["body"]["filter"]
    assert 'resource.type="aiplatform.googleapis.com/Endpoint"' in query
    assert f'resource.labels.endpoint_id="{OURS}"' in query and "timestamp>=" in query  # never unbounded
    assert listed["body"]["resourceNames"] == [f"projects/{PROJECT}"]


def test_lines_and_since_bound_what_is_read(cli: Cli, cloud: Emulator, tmp_path: Path) -> None:
    _record_endpoint(tmp_path)
    for minutes in (50, 40, 30, 20, 10):
        _plant(cloud, f"{minutes} min ago", timedelta(minutes=minutes))
    assert _texts(cli("logs", "-n", "2", env=cloud.env()).out) == ["20 min ago", "10 min ago"]
    assert _texts(cli("logs", "--since", "35m", env=cloud.env()).out) == ["30 min ago", "20 min ago", "10 min ago"]
    assert _texts(cli("logs", "--since", "35m", "-n", "1", env=cloud.env()).out) == ["10 min ago"]


def test_a_new_folder_finds_the_endpoint_by_its_label_as_teardown_does(cli: Cli, cloud: Emulator) -> None:
    name = f"projects/{PROJECT}/locations/{REGION}/endpoints/{OURS}"
    with cloud.world.lock:
        cloud.world.table("endpoints")[name] = {"name": name, "labels": {"sdxlctl-deployment": "sdxl"}}
    _plant(cloud, "billing, and found", timedelta(minutes=1))
    result = cli("logs", env=cloud.env())  # tmp_path has no state file
    assert result.code == 0, result.err
    assert _texts(result.out) == ["billing, and found"]


def test_nothing_deployed_is_one_line_naming_the_label(cli: Cli, cloud: Emulator) -> None:
    result = cli("logs", env=cloud.env())
    assert result.code == 1 and result.out == ""
    assert "no endpoint of 'sdxl'" in result.err and "sdxlctl-deployment=sdxl" in result.err
    assert "sdxlctl deploy" in result.err and "Traceback" not in result.err
    assert "no UI of 'sdxl'" in cli("logs", "--ui", env=cloud.env()).err


def test_a_refused_read_names_the_role_to_grant(cli: Cli, cloud: Emulator, tmp_path: Path) -> None:
    _record_endpoint(tmp_path)
    cloud.fault(path="/v2/entries:list", code=403, message="Permission 'logging.logEntries.list' denied.")
    result = cli("logs", env=cloud.env())
    assert result.code == 1 and "Traceback" not in result.err
    assert "logging.logEntries.list" in result.err and "roles/logging.viewer" in result.err


def test_the_uis_log_is_its_cloud_run_services(cli: Cli, cloud: Emulator, tmp_path: Path) -> None:
    service = f"projects/{PROJECT}/locations/{REGION}/services/sdxl-ui"
    with StateStore(tmp_path / ".sdxlctl").transaction() as state:
        state.put("sdxl", Resource(kind="ui-service", name=service, target="vertex"))
    resource = {"type": "cloud_run_revision", "labels": {"service_name": "sdxl-ui", "location": REGION}}
    request = {"requestMethod": "POST", "status": 200, "requestUrl": "https://sdxl-ui.run.app/"}
    log = f"projects/{PROJECT}/logs/run.googleapis.com%2Frequests"
    _write(cloud, {"logName": log, "resource": resource, "severity": "INFO", "httpRequest": request})
    result = cli("logs", "--ui", env=cloud.env())
    assert result.code == 0, result.err
    assert _texts(result.out) == ["POST 200 https://sdxl-ui.run.app/"]


def test_follow_shows_every_entry_once_also_one_that_arrives_late(cloud: Emulator, tmp_path: Path) -> None:
    _record_endpoint(tmp_path)
    _plant(cloud, "before", timedelta(seconds=30), insert_id="a")
    polls = [
        lambda: _plant(cloud, "new", timedelta(seconds=1), insert_id="b"),
        lambda: None,  # nothing new: the same window is read again, nothing shown twice
        lambda: _plant(cloud, "late, older than the newest", timedelta(seconds=20), insert_id="c"),
        lambda: _plant(cloud, "newest", timedelta(seconds=0), insert_id="d"),
    ]
    config = load_config(None, environ={**cloud.env(), "SDXLCTL_GCP_POLL_INTERVAL_S": "0.05"})
    config = config.model_copy(update={"path": tmp_path / "sdxlctl.toml"})  # the state beside it
    shown = vertex_logs(
        config,
        StateStore(tmp_path / ".sdxlctl"),
        LogRequest(follow=True),
        sleep=lambda _: polls.pop(0)(),
    )
    texts = [next(shown).text for _ in range(4)]
    assert texts == ["before", "new", "late, older than the newest", "newest"]
    assert not polls  # each poll ran once: nothing was shown twice in between
    listed = [r["body"]["filter"] for r in cloud.requests() if r["path"] == "/v2/entries:list"]
    assert len(listed) == 5  # the first read, then one per poll


def test_the_deployed_servers_own_stdout_comes_back_as_its_endpoints_entries(
    cli: Cli, cloud: Emulator, servers: ModelServers, tmp_path: Path
) -> None:
    """What the server prints is what `logs` shows on vertex: its JSON lines' severity, time and fields."""
    import logging

    from sdxl_server.logs import JsonFormatter

    stdout = tmp_path / "model-42.log"
    record = logging.LogRecord("sdxl_server", logging.WARNING, __file__, 1, "queue full", None, None)
    record.fields = {"queue": 4}
    stdout.write_text(JsonFormatter().format(record) + "\nTraceback (most recent call last):\n")
    servers.replicas["42"] = Replica("http://127.0.0.1:9", "/health", "/predict", None, stdout)
    name = f"projects/{PROJECT}/locations/{REGION}/endpoints/{OURS}"
    with cloud.world.lock:
        cloud.world.table("endpoints")[name] = {"name": name, "deployedModels": [{"id": "42"}]}
    _record_endpoint(tmp_path)
    result = cli("logs", env=cloud.env())
    assert result.code == 0, result.err
    first, second = result.out.splitlines()
    assert first.split()[1:] == ["WARNING", "queue", "full", '{"queue":', "4}"]
    assert abs((datetime.fromisoformat(first.split()[0]) - datetime.now(UTC)).total_seconds()) < 60
    assert second.split(None, 2)[1:] == ["DEFAULT", "Traceback (most recent call last):"]
