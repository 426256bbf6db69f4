"""`sdxlctl logs` on target local: the server's (or the UI's) log file, its last lines, since a time, followed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sdxlctl.cli.logs_cmd import parse_since
from sdxlctl.local import logfile
from sdxlctl.state import Resource, StateStore
from tests.conftest import Cli

ROOT = Path(__file__).resolve().parents[2]


def _stamp(ago: timedelta) -> str:
    return (datetime.now(UTC) - ago).isoformat(timespec="milliseconds")


def _json_line(message: str, ago: timedelta) -> str:
    return json.dumps({"severity": "INFO", "message": message, "time": _stamp(ago)})


def _server_log(folder: Path, text: str, name: str = "sdxl-server.log") -> Path:
    """A log where the local target writes it (.sdxlctl/logs/<deployment>-server.log)."""
    path = folder / ".sdxlctl" / "logs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_logs_prints_the_server_log_and_its_last_lines(cli: Cli, tmp_path: Path) -> None:
    _server_log(tmp_path, "one\ntwo\nthree\nstill being writ")
    result = cli("logs")
    assert result.code == 0, result.err
    assert result.out == "one\ntwo\nthree\nstill being writ\n" and result.err == ""
    assert cli("logs", "-n", "2").out == "three\nstill being writ\n"
    assert cli("logs", "--lines", "0").out == ""


def test_the_last_lines_of_a_big_log_are_found_from_its_end(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    long_line = "x" * 200_000  # longer than the first block read from the end
    path.write_text("".join(f"line {n}\n" for n in range(200_000)) + long_line + "\nlast, unfinished")
    texts = [line.text for line in logfile.read(path, lines=3, since=None, follow=False)]
    assert texts == ["line 199999", long_line, "last, unfinished"]
    path.write_text("only\ntwo\n")
    assert [line.text for line in logfile.read(path, lines=5, since=None, follow=False)] == ["only", "two"]


def test_logs_since_keeps_newer_lines_and_their_tracebacks(cli: Cli, tmp_path: Path) -> None:
    lines = [
        "before any time: goes with the first timed line",
        _json_line("old", timedelta(hours=2)),
        "Traceback of the old line",
        _json_line("new", timedelta(minutes=5)),
        "Traceback of the new line",
        "2026-01-01T00:00:00Z a plain line with an old time of its own",
    ]
    _server_log(tmp_path, "\n".join(lines) + "\n")
    result = cli("logs", "--since", "10m")
    assert result.code == 0, result.err
    assert result.out.splitlines() == lines[3:5]
    assert cli("logs", "--since", "3h").out.splitlines() == lines[:5]
    assert cli("logs", "--since", "3h", "-n", "1").out.splitlines() == lines[4:5]


def test_since_with_lines_that_carry_no_time_says_so_and_goes_by_the_files_change(cli: Cli, tmp_path: Path) -> None:
    path = _server_log(tmp_path, "* Running on local URL: http://127.0.0.1:7860\n", "sdxl-ui.log")
    old = time.time() - 7200
    os.utime(path, (old, old))
    result = cli("logs", "--ui", "--since", "1h")
    assert result.code == 0 and result.out == ""
    assert "carry no time" in result.err
    assert cli("logs", "--ui", "--since", "3h").out.startswith("* Running")


def test_since_takes_durations_and_times_and_refuses_the_rest(cli: Cli, tmp_path: Path) -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    assert parse_since("10m", now) == now - timedelta(minutes=10)
    assert parse_since("1.5h", now) == now - timedelta(minutes=90)
    assert parse_since("2026-12-02T10:00:00Z", now) == datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    _server_log(tmp_path, "x\n")
    result = cli("logs", "--since", "ten minutes")
    assert result.code == 2 and result.out == ""
    assert "--since" in result.err and "30s, 10m" in result.err and "Traceback" not in result.err


def test_the_model_servers_own_lines_carry_the_time_since_reads() -> None:
    import logging

    from sdxl_server.logs import JsonFormatter

    record = logging.LogRecord("sdxl_server", logging.INFO, __file__, 1, "model ready", None, None)
    line = JsonFormatter().format(record)
    when = logfile.line_time(line)
    assert when is not None and abs((when - datetime.now(UTC)).total_seconds()) < 60


def test_nothing_started_here_is_one_line_naming_the_command(cli: Cli) -> None:
    result = cli("logs")
    assert result.code == 1 and result.out == ""
    assert len(result.err.strip().splitlines()) == 2  # the error and its hint
    assert "no log of the model server of 'sdxl'" in result.err and "sdxlctl deploy" in result.err
    assert "sdxlctl ui-deploy" in cli("logs", "--ui").err


def test_the_log_the_state_file_records_is_the_one_shown(cli: Cli, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.log"
    elsewhere.write_text("from the recorded log\n")
    _server_log(tmp_path, "not this one\n")
    with StateStore(tmp_path / ".sdxlctl").transaction() as state:
        details = {"pid": 0, "log": str(elsewhere)}
        state.put("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", details=details))
    assert cli("logs").out == "from the recorded log\n"


def test_follow_shows_each_appended_line_once_across_a_truncation_and_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_text("first\nhalf")
    steps = [
        lambda: _append(path, " a line\nsecond\n"),
        lambda: None,  # nothing new: nothing shown
        lambda: path.write_text("after truncation\n"),  # shorter than what was read: read from the start
        path.unlink,  # between a removal and a new start
        lambda: path.write_text("a new file, same name, grown far longer than the old one\n"),
    ]

    def sleep(_: float) -> None:
        steps.pop(0)()

    shown = logfile.read(path, lines=1, since=None, follow=True, sleep=sleep)
    texts = [next(shown).text for _ in range(5)]
    assert texts == [
        "first",
        "half a line",
        "second",
        "after truncation",
        "a new file, same name, grown far longer than the old one",
    ]


def _append(path: Path, text: str) -> None:
    with path.open("a") as file:
        file.write(text)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}
    return {**env, "COLUMNS": "80", "PYTHONPATH": str(ROOT)}


def test_follow_in_a_pipe_prints_new_lines_and_ctrl_c_ends_it_quietly_with_130(tmp_path: Path) -> None:
    path = _server_log(tmp_path, "old line\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "sdxlctl", "logs", "-f"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "old line\n"
        _append(path, "new line\n")
        assert process.stdout.readline() == "new line\n"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert out == "" and err == ""  # no traceback, no "interrupted" note: Ctrl-C is how a follow ends


def test_a_reader_that_stops_early_is_no_error(tmp_path: Path) -> None:
    _server_log(tmp_path, "".join(f"line {n}\n" for n in range(100_000)))
    piped = subprocess.run(
        ["bash", "-c", f"'{sys.executable}' -m sdxlctl logs | head -n 1; exit ${{PIPESTATUS[0]}}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.stdout == "line 0\n"
    assert piped.returncode == 0 and piped.stderr == ""  # sdxlctl's own status, not head's


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_names_every_option(cli: Cli, flag: str) -> None:
    result = cli("logs", flag)
    assert result.code == 0
    for option in ("--ui", "--lines", "-n", "--follow", "-f", "--since", "10m"):
        assert option in result.out, option
