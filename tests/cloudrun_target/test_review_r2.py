"""Review of the emulator's Cloud Run front end and instances (R2): races, leaks, logs and the standalone emulator."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cloudrun_target.test_emulator_instances import client, create, until
from tests.emulator.app import create_app
from tests.emulator.core import DEPLOYER, World
from tests.emulator.identity import issue
from tests.emulator.model_servers import ModelServers, start_process, stop_process
from tests.emulator_fixtures import Emulator
from tests.servers import free_port, serve_app

ROOT = Path(__file__).resolve().parents[2]


def call(emulator: Emulator, service: Any, timeout: float = 60) -> httpx.Response:
    token = issue(emulator.world, DEPLOYER, service.uri)
    return httpx.get(service.uri + "/health", headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


class StandIn:
    """The "-server" instances' stand-in: its /health (the startup probe's path) fails until `ready` is set."""

    def __init__(self) -> None:
        self.ready = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status = 200 if scope["path"] != "/health" or self.ready.is_set() else 503
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def held(gcs: str) -> Iterator[tuple[Emulator, StandIn, Any]]:
    """An emulator whose instances pass their startup probe (every 0.1 s, 60 tries) only once the test says."""
    stand_in = StandIn()
    world = World(run_probe_scale=0.01, run_idle_s=3600)
    app = create_app(world, servers=ModelServers(forward_to="http://127.0.0.1:1"))
    with serve_app(stand_in) as backend:
        app.state.servers.forward_to = backend.url
        with serve_app(app) as em:
            yield Emulator(em.url, gcs, world), stand_in, app
            stand_in.ready.set()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage() + (str(record.exc_info[1]) if record.exc_info else ""))


def test_a_caller_that_gives_up_during_a_cold_start_leaves_no_traceback(
    held: tuple[Emulator, StandIn, Any],
) -> None:
    """sdxlctl's first health poll gives up after 3 s of a cold start: uvicorn printed ClientDisconnect's traceback
    (into the CLI's stderr, where the emulator runs in the test's process) once the instance was up."""
    emulator, stand_in, app = held
    service = create(emulator)
    records = Records()
    logging.getLogger("uvicorn.error").addHandler(records)  # after the listeners' uvicorn configured logging
    try:
        with pytest.raises(httpx.TimeoutException):
            call(emulator, service, timeout=0.5)
        stand_in.ready.set()
        frontend = app.state.instances.find("sdxl-server")
        until(lambda: frontend.in_flight == 0 and emulator.instances("sdxl-server") == 1)
        assert call(emulator, service).status_code == 200  # the instance the one who left started serves the next
    finally:
        logging.getLogger("uvicorn.error").removeHandler(records)
    assert records.messages == []
    assert emulator.instance_starts("sdxl-server") == 1


def test_two_first_requests_at_once_start_one_instance(held: tuple[Emulator, StandIn, Any]) -> None:
    emulator, stand_in, app = held
    service = create(emulator)
    answers: list[int] = []
    callers = [threading.Thread(target=lambda: answers.append(call(emulator, service).status_code)) for _ in range(2)]
    for caller in callers:
        caller.start()
    frontend = app.state.instances.find("sdxl-server")
    until(lambda: frontend.in_flight == 2)  # both wait on the one start
    stand_in.ready.set()
    for caller in callers:
        caller.join(30)
    assert answers == [200, 200] and emulator.instance_starts("sdxl-server") == 1


def test_a_service_deleted_during_a_cold_start_keeps_no_instance(held: tuple[Emulator, StandIn, Any]) -> None:
    """The start in progress used to finish after the delete and stay up, counted and billed, with nobody to stop it
    (the delete had already forgotten the service's front end): a real container process leaked."""
    emulator, stand_in, app = held
    service = create(emulator)
    answers: list[httpx.Response | Exception] = []

    def first() -> None:
        try:
            answers.append(call(emulator, service, timeout=30))
        except httpx.HTTPError as exc:
            answers.append(exc)

    caller = threading.Thread(target=first)
    caller.start()
    until(lambda: emulator.instance_starts("sdxl-server") == 1)
    client(emulator.url).delete_service(name=service.name).result(30)
    stand_in.ready.set()
    caller.join(30)
    lives = app.state.instances.lives[service.name]
    assert len(lives) == 1 and lives[0][1] is not None  # stopped, not billed from now on


def test_a_start_that_ends_after_a_new_revision_serves_one_request_and_the_next_runs_the_new_one(
    held: tuple[Emulator, StandIn, Any],
) -> None:
    emulator, stand_in, app = held
    service = create(emulator)
    answers: list[int] = []
    caller = threading.Thread(target=lambda: answers.append(call(emulator, service).status_code))
    caller.start()
    until(lambda: emulator.instance_starts("sdxl-server") == 1)
    service.template.max_instance_request_concurrency = 2
    updated = client(emulator.url).update_service(service=service).result(30)
    stand_in.ready.set()
    caller.join(30)
    assert answers == [200]
    assert call(emulator, updated).status_code == 200
    instance = app.state.instances.find("sdxl-server").instance
    assert instance.revision == updated.latest_ready_revision.rsplit("/", 1)[-1]
    assert emulator.instance_starts("sdxl-server") == 2


def test_a_container_without_a_startup_probe_gets_cloud_runs_whole_tcp_window(gcs: str) -> None:
    """Cloud Run's default TCP probe waits up to 240 s for the port: the emulator's probe scale, which shortens
    the periods a service declares, cut it to 2.4 s at 0.01 (the UI's instances, a gradio start, have no probe)."""
    port = free_port()
    world = World(run_probe_scale=0.001, run_idle_s=3600)
    with serve_app(create_app(world, servers=ModelServers(forward_to=f"http://127.0.0.1:{port}"))) as em:
        emulator = Emulator(em.url, gcs, world)
        service = create(emulator)
        service.template.containers[0].startup_probe = None
        service = client(emulator.url).update_service(service=service).result(30)
        assert not service.template.containers[0].startup_probe.period_seconds

        def late_listener() -> None:
            time.sleep(2)
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen()
                connection, _ = sock.accept()  # the probe's connection
                connection.close()
                connection, _ = sock.accept()  # the request
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                connection.close()

        listener = threading.Thread(target=late_listener, daemon=True)
        listener.start()
        answer = call(emulator, service, timeout=60)
        listener.join(10)
        assert answer.status_code == 200, answer.text


def test_the_emulators_request_log_keeps_a_handlers_own_status(emulator: Emulator) -> None:
    """A handler answering with its own Response (the token endpoint's OAuth errors, the metadata server's 403)
    was logged as 200."""
    bad_grant = httpx.post(f"{emulator.url}/token", data={"grant_type": "password"})
    no_flavor = httpx.get(f"{emulator.url}/_metadata/x/computeMetadata/v1/instance/")
    assert (bad_grant.status_code, no_flavor.status_code) == (400, 403)
    logged = {r["path"]: r["status"] for r in emulator.requests()}
    assert logged["/token"] == 400 and logged["/_metadata/x/computeMetadata/v1/instance/"] == 403


def test_stopping_the_emulator_leaves_no_listener_or_reaper_thread(gcs: str) -> None:
    before = set(threading.enumerate())
    world = World(run_probe_scale=0.01, run_idle_s=3600)
    with serve_app(create_app(world, servers=ModelServers(forward_to="http://127.0.0.1:1"))) as em:
        emulator = Emulator(em.url, gcs, world)
        create(emulator)
        until(lambda: len(set(threading.enumerate()) - before) >= 3)  # the emulator, the service's listener, the reaper
    until(lambda: not [t for t in set(threading.enumerate()) - before if t.is_alive()], timeout=20)


def test_a_process_already_reaped_is_never_signalled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once poll() reaped an exited container, its pid (its group's id) may be another process's: no killpg."""
    process = start_process([sys.executable, "-c", "pass"], dict(os.environ), tmp_path / "log")
    process.wait()
    signalled: list[int] = []
    monkeypatch.setattr(os, "killpg", lambda pid, sig: signalled.append(pid))
    stop_process(process)
    assert signalled == []


def test_container_processes_stop_when_the_python_that_started_them_exits(tmp_path: Path) -> None:
    """Each runs in a session of its own, so nothing stops it with the test process: a run that never reaches the
    emulator's shutdown (a hung test, Ctrl-C) left `python -m sdxl_server` processes behind."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from tests.emulator.model_servers import start_process
        sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
        process = start_process(sleeper, {{}}, Path({str(tmp_path)!r}) / "log")
        print(process.pid, flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    try:
        until(lambda: not _alive(pid), timeout=10)
    finally:
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)  # the group the child started: ours, leaked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # an exited orphan waiting for init is not running
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_standalone_emulator_gives_the_deployers_key_file_for_id_tokens(tmp_path: Path) -> None:
    """`python -m tests.emulator` for target cloudrun: sdxlctl predict needs an ID token from a key file whose token_uri
    is the emulator; the emulator writes the deployer's and says what to export."""
    from google.auth.transport.requests import Request
    from google.oauth2 import service_account

    port = free_port()
    command = [sys.executable, "-m", "tests.emulator", "--port", str(port), "--gcs-port", str(free_port())]
    key = tmp_path / "deployer.json"
    process = subprocess.Popen(
        [*command, "--key-file", str(key)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
        assert f"  export GOOGLE_APPLICATION_CREDENTIALS={key}\n" in lines, lines
        assert f"  export SDXLCTL_GCP_API_ENDPOINT=http://127.0.0.1:{port}\n" in lines
        until(lambda: _answers(f"http://127.0.0.1:{port}/oauth2/v1/certs"))
        credentials = service_account.IDTokenCredentials.from_service_account_file(
            str(key), target_audience="http://127.0.0.1:1"
        )
        credentials.refresh(Request())
        assert credentials.token.count(".") == 2
        assert credentials.service_account_email == "deployer@demo-project.iam.gserviceaccount.com"
    finally:
        process.terminate()
        process.wait(20)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_ui_waits_for_a_cloud_run_answer_as_long_as_cloud_run_may_take() -> None:
    """The first request after scale to zero waits through the instance's start (minutes for SDXL on an L4), and
    Cloud Run answers 504 itself past the service's timeout (up to 3600 s): the UI gave up at 120 s, saying
    "the model may be overloaded", while the request ran on (and was billed)."""
    from sdxl_ui.backend import from_environment

    private = from_environment("https://sdxl-server-abc-ew.a.run.app", auth="id-token")
    assert private.timeout_s > 3600
    assert from_environment("http://127.0.0.1:8080").timeout_s == 120
