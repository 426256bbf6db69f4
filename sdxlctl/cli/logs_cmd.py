"""`sdxlctl logs`: the model server's (or the UI's) log, printed or followed."""

from __future__ import annotations

import re
import signal
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from sdxlctl.cli.root import app, options

if TYPE_CHECKING:
    from sdxlctl.steps import LogLine

UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
SINCE_HELP = "only lines newer than this: 30s, 10m, 2h, 1d, or a time such as 2026-12-02T10:00:00Z"


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """--since as a time: a duration back from now (as `docker logs --since 10m`) or an ISO 8601 time."""
    if value is None:
        return None
    now = now or datetime.now(UTC)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if match:
        return now - timedelta(**{UNITS[match.group(2)]: float(match.group(1))})
    try:
        stamp = datetime.fromisoformat(value.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither a duration (30s, 10m, 2h, 1d, 1w) nor a time (2026-12-02T10:00:00Z)"
        ) from None
    return stamp if stamp.tzinfo else stamp.astimezone()  # no zone: this machine's, as `date` shows it


def text_of(line: LogLine) -> str:
    """A cloud entry with its time and severity in front (as gcloud shows them); a file's line as it is."""
    if not line.severity:
        return line.text
    stamp = line.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z" if line.time else "-"
    return f"{stamp} {line.severity:<7} {line.text}"


def _check_since(value: str | None) -> str | None:
    parse_since(value)  # refused before any file or API is read; the time is taken when the command runs
    return value


@app.command()
def logs(
    ui: Annotated[bool, typer.Option("--ui", help="the UI's log instead of the model server's")] = False,
    lines: Annotated[
        int | None, typer.Option("--lines", "-n", min=0, metavar="N", help="only the last N lines")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="then print new lines as they come, until Ctrl-C")
    ] = False,
    since: Annotated[str | None, typer.Option(callback=_check_since, metavar="WHEN", help=SINCE_HELP)] = None,
) -> None:
    """The model server's log: target local its log file, vertex/cloudrun the endpoint's/service's Cloud Logging."""
    from sdxlctl import core
    from sdxlctl.cli import render
    from sdxlctl.config import load_config
    from sdxlctl.state import StateStore
    from sdxlctl.steps import LogRequest

    start = parse_since(since)
    config = load_config(options.config_path)
    # Ctrl-C is how a follow ends, not an interruption of work: exit 130 with no message, as `tail -f` does.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if _main_thread() else None
    try:
        request = LogRequest(ui=ui, lines=lines, since=start, follow=follow)
        for line in core.logs(config, StateStore(config.home), request, warn=render.warning):
            sys.stdout.write(text_of(line) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `sdxlctl logs | head`: the reader has what it wanted
        _silence_stdout()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit does not fail on the closed pipe too."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file behind stdout (a test's capture): nothing to flush
        pass
