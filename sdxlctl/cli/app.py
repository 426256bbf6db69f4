"""Running the app: the one place errors become messages and exit codes."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import typer

from sdxlctl.cli.console import err
from sdxlctl.cli.root import app, options
from sdxlctl.errors import ExitCode, SdxlctlError, from_os_error


def run(argv: list[str]) -> int:
    """Run the app on `argv`; every failure becomes a message on stderr and an exit code."""
    from rich.markup import escape

    from sdxlctl.cli import (
        batch_cmd,  # noqa: F401  (registers `sdxlctl batch`)
        check_cmd,  # noqa: F401  (registers `sdxlctl check`)
        commands,  # noqa: F401  (registers the commands)
        config_cmd,  # noqa: F401  (registers `sdxlctl config`)
        cost_cmd,  # noqa: F401  (registers `sdxlctl cost`)
        init_cmd,  # noqa: F401  (registers `sdxlctl init`)
        logs_cmd,  # noqa: F401  (registers `sdxlctl logs`)
        lora_cmd,  # noqa: F401  (registers `sdxlctl lora push`)
        styles,  # noqa: F401  (registers `sdxlctl styles`)
    )

    options.config_path, options.debug = None, "--debug" in argv
    interrupted: list[bool] = []
    try:
        with _noting_interrupts(interrupted):
            result = app(args=argv, prog_name="sdxlctl", standalone_mode=False)
    except OSError as exc:  # an ordinary OS error nobody caught closer to its cause: still one line
        if options.debug:
            raise
        return _show(from_os_error(exc))
    except SdxlctlError as exc:
        if options.debug:
            err.print_exception()
        return _show(exc)
    except KeyboardInterrupt:
        err.print(INTERRUPTED)
        return ExitCode.INTERRUPTED
    except typer.Abort:  # a confirmation answered no, or Ctrl-C at it: before anything was done
        err.print("aborted: nothing was changed")
        return ExitCode.INTERRUPTED if interrupted else ExitCode.FAILED
    except typer.TyperException as exc:  # usage errors of typer's (vendored) click
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            err.print(exc.format_message(), highlight=False)
        return ExitCode.USAGE if exc.exit_code == 2 else exc.exit_code
    except Exception as exc:
        if options.debug:
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        err.print("[dim]hint:[/] run again with --debug for the traceback, and report it")
        return ExitCode.FAILED
    if result == ExitCode.INTERRUPTED and interrupted:
        # Typer turns Ctrl-C into a silent Exit(130) where no step said what it left behind.
        err.print(INTERRUPTED, soft_wrap=True)
    return result if isinstance(result, int) else ExitCode.OK


INTERRUPTED = "interrupted; `sdxlctl status` shows what exists and runs"


def _show(exc: SdxlctlError) -> int:
    from rich.markup import escape

    # soft_wrap: one line stays one line in a log or a pipe; a terminal still wraps it for the eye.
    err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
    if exc.hint:
        err.print(f"[dim]hint:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
    return exc.exit_code


@contextmanager
def _noting_interrupts(seen: list[bool]) -> Iterator[None]:
    """Ctrl-C still raises KeyboardInterrupt where it lands, and leaves a note that it came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, frame: FrameType | None) -> None:
        seen.append(True)
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))
