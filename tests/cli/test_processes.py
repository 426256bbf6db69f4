"""Local processes: sdxlctl signals only what it started, and finds it again without the state file.

The CLI runs as a real process in a session of its own: if it ever signalled its own process group
(`os.killpg(0, ...)`), it would kill itself, not pytest, and the test would see it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sdxlctl.local import processes as local
from sdxlctl.state import Resource, StateStore
from tests.servers import free_port

CLI = [sys.executable, "-m", "sdxlctl"]


def sdxlctl(
    folder: Path, *args: str, port: int | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}
    env.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    if port is not None:
        env["SDXLCTL_LOCAL_SERVER_PORT"] = str(port)
    return subprocess.run(
        [*CLI, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )


def record(folder: Path, details: dict[str, Any]) -> StateStore:
    store = StateStore(folder / ".sdxlctl")
    with store.transaction() as state:
        resource = Resource(kind="local-server", name="sdxl-server", target="local", url="http://x:9", details=details)
        state.put("sdxl", resource)
    return store


def alive(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is None


def server_pid(folder: Path) -> int | None:
    resource = StateStore(folder / ".sdxlctl").read().get("sdxl", "local-server")
    return None if resource is None else int(resource.details["pid"])


def gone(pid: int) -> bool:
    return local.identity(pid) is None


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process leading its own group, whose command line even mentions sdxl_server."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "-m", "sdxl_server"], start_new_session=True
    )
    yield process
    process.kill()
    process.wait()


def _pytest_identity() -> dict[str, Any]:
    return {"pid": os.getpid(), **_identity_of(os.getpid()), "module": "sdxl_server"}


def _identity_of(pid: int) -> dict[str, Any]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    cmdline = [p.decode() for p in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    return {"started": f"{boot}:{stat[19]}", "cmdline": cmdline}


RECORDS: dict[str, Callable[[subprocess.Popen[bytes]], dict[str, Any]]] = {
    "pid-0": lambda _: {"pid": 0, "module": "sdxl_server"},
    "pid-minus-1": lambda _: {"pid": -1, "module": "sdxl_server"},
    "pid-1": lambda _: {"pid": 1, "module": "sdxl_server"},
    "pid-missing": lambda _: {"module": "sdxl_server"},
    "pid-as-text": lambda _: {"pid": "0", "module": "sdxl_server"},
    # The test runner, recorded as sdxlctl would record a process, less the marker in its environment.
    "the-test-runner": lambda _: _pytest_identity(),
    # A pid reused by an unrelated process: its command line, but not the start time that was recorded.
    "a-reused-pid": lambda p: {"pid": p.pid, **_identity_of(p.pid), "started": "boot:1", "module": "sdxl_server"},
    # A record from before start times were kept: only a `python -m sdxl_server` on the recorded port is ours.
    "an-old-record": lambda p: {"pid": p.pid, "module": "sdxl_server", "port": 9},
}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("case", list(RECORDS))
def test_teardown_signals_nothing_that_is_not_its_own_and_forgets_the_entry(
    tmp_path: Path, bystander: subprocess.Popen[bytes], case: str
) -> None:
    store = record(tmp_path, RECORDS[case](bystander))
    down = sdxlctl(tmp_path, "teardown", "--yes", timeout=60)
    assert down.returncode == 0, (down.returncode, down.stderr)  # -15 or -9: it signalled its own group
    assert alive(bystander)
    assert "Traceback" not in down.stderr and "internal error" not in down.stderr
    assert any(words in down.stderr for words in ("nothing signalled", "left alone", "already gone")), down.stderr
    assert store.read().of("sdxl") == {}  # forgotten: a second teardown has nothing to do
    again = sdxlctl(tmp_path, "teardown", "--yes", timeout=60)
    assert again.returncode == 0 and "nothing to tear down" in again.stderr


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_deploy_over_a_record_that_is_not_its_process_leaves_that_process_alone(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    port = free_port()
    record(tmp_path, {"pid": bystander.pid, **_identity_of(bystander.pid), "started": "boot:1", "digest": "old"})
    deployed = sdxlctl(tmp_path, "deploy", port=port)
    try:
        assert deployed.returncode == 0, deployed.stderr
        pid = server_pid(tmp_path)
        assert pid is not None and pid != bystander.pid and not gone(pid)
        assert alive(bystander)
    finally:
        down = sdxlctl(tmp_path, "teardown", "--yes", port=port)
    assert down.returncode == 0, down.stderr
    assert alive(bystander) and pid is not None and gone(pid)


def test_a_damaged_state_file_is_one_line_and_a_moved_aside_one_loses_no_server(tmp_path: Path) -> None:
    port = free_port()
    assert sdxlctl(tmp_path, "deploy", port=port).returncode == 0
    pid = server_pid(tmp_path)
    assert pid is not None
    state = tmp_path / ".sdxlctl" / "state.json"
    try:
        state.write_text('{"version": 1, "resources": {')
        for command in (["status"], ["teardown", "--yes"], ["deploy"]):
            refused = sdxlctl(tmp_path, *command, port=port)
            assert refused.returncode == 1, (command, refused.stderr)
            assert "is not a state file sdxlctl can read" in refused.stderr and "move it aside" in refused.stderr
            assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) <= 4
        assert not gone(pid)

        state.rename(state.with_name("state.json.damaged"))  # as the hint says
        again = sdxlctl(tmp_path, "deploy", port=port)  # finds its server by the record in run/: no busy port
        assert again.returncode == 0, again.stderr
        assert server_pid(tmp_path) == pid
    finally:
        down = sdxlctl(tmp_path, "teardown", "--yes", port=port)
    assert down.returncode == 0, down.stderr
    assert gone(pid)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc")
def test_with_the_whole_state_folder_gone_teardown_finds_the_server_by_its_marker(tmp_path: Path) -> None:
    port = free_port()
    assert sdxlctl(tmp_path, "deploy", port=port).returncode == 0
    pid = server_pid(tmp_path)
    assert pid is not None
    try:
        shutil.rmtree(tmp_path / ".sdxlctl")
        (row,) = json.loads(sdxlctl(tmp_path, "status", "--json", port=port).stdout)["resources"]
        assert row["details"]["pid"] == pid and row["state"].endswith("(not in the state file)")
        plan = sdxlctl(tmp_path, "teardown", "--dry-run", port=port)
        assert plan.returncode == 0 and "sdxl-server" in plan.stderr and not gone(pid)
        down = sdxlctl(tmp_path, "teardown", "--yes", port=port)
        assert down.returncode == 0 and "1 removed" in down.stderr, down.stderr
        assert gone(pid)
        redeployed = sdxlctl(tmp_path, "deploy", port=port)  # the port is free again
        assert redeployed.returncode == 0, redeployed.stderr
    finally:
        final = sdxlctl(tmp_path, "teardown", "--yes", port=port)
    assert final.returncode == 0
    assert json.loads(sdxlctl(tmp_path, "status", "--json").stdout)["resources"] == []


def test_a_folder_with_the_same_deployment_name_is_not_touched(tmp_path: Path) -> None:
    """Two folders both deploy `sdxl`: the marker names the folder, so one's teardown spares the other's server."""
    port = free_port()
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    assert sdxlctl(theirs, "deploy", port=port).returncode == 0
    pid = server_pid(theirs)
    assert pid is not None
    try:
        down = sdxlctl(mine, "teardown", "--yes", port=port)
        assert down.returncode == 0 and "nothing to tear down" in down.stderr
        assert not gone(pid)
    finally:
        assert sdxlctl(theirs, "teardown", "--yes", port=port).returncode == 0
    assert gone(pid)


def test_a_copied_folder_does_not_stop_the_server_of_the_folder_it_was_copied_from(tmp_path: Path) -> None:
    """cp -r copies the state file, records and all: the copy's teardown must spare the original's server."""
    port = free_port()
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    assert sdxlctl(original, "deploy", port=port).returncode == 0
    pid = server_pid(original)
    assert pid is not None
    try:
        shutil.copytree(original, copy)
        down = sdxlctl(copy, "teardown", "--yes", port=port)
        assert down.returncode == 0, down.stderr
        assert f"started from {original.resolve()}" in down.stderr
        assert not gone(pid)
    finally:
        assert sdxlctl(original, "teardown", "--yes", port=port).returncode == 0
    assert gone(pid)


def test_a_marked_process_is_found_by_its_session_leader_not_its_children(tmp_path: Path) -> None:
    """A server's children inherit its marker; only the process start() made (the session leader) is it."""
    mark = local.marker(tmp_path, "sdxl", "local-server")
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 600 & wait"], env={**os.environ, local.MARKER_VAR: mark}, start_new_session=True
    )
    try:
        for _ in range(100):  # until the child is there
            children = Path(f"/proc/{leader.pid}/task/{leader.pid}/children").read_text().split()
            if children:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert children, "the child never started"
        assert local.find_marked(mark) == [leader.pid]
    finally:
        os.killpg(leader.pid, 9)
        leader.wait()


EXECS_ON_SIGTERM = """
import os, signal, time
def on_term(*_):  # the same pid and start time from here on, under another command line
    os.execv("/bin/sleep", ["sleep", "60"])
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_stop_waits_for_the_process_itself_not_for_its_command_line_to_change(tmp_path: Path) -> None:
    # An exiting process's command line reads empty before it is gone (the kernel frees its memory first):
    # stop() took that for "stopped" and teardown returned with the server still there (seen once in CI).
    # A process that execs another program on SIGTERM shows the same thing for as long as the test likes.
    (tmp_path / "execs_on_sigterm.py").write_text(EXECS_ON_SIGTERM)
    spec = local.ProcessSpec(
        kind="local-server", module="execs_on_sigterm", port=free_port(), env={"PYTHONPATH": str(tmp_path)}
    )
    log = tmp_path / "process.log"
    pid = local.start(spec, log, mark="test-mark")
    try:
        identity = local.identity_after_start(pid)
        assert identity is not None
        details = {"pid": pid, **identity.details(), "marker": "test-mark"}
        deadline = time.monotonic() + 30
        while "ready" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert local.owns(details)
        assert local.stop(details, timeout_s=1.0)
        assert gone(pid), local.identity(pid)  # stopped means gone: SIGKILL after the timeout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
