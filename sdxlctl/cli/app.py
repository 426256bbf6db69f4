"""The Typer app, its global options, and the one place errors become messages and exit codes."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from sdxlctl import __version__
from sdxlctl.cli.console import err
from sdxlctl.errors import ExitCode, SdxlctlError

app = typer.Typer(
    name="sdxlctl",
    help="Stable Diffusion XL on Google Cloud (and on this machine) from one TOML file.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,  # tracebacks show locals: secrets; only --debug shows a traceback
    rich_markup_mode="rich",
)


@dataclass
class Options:
    """Global options, set by the callback before any command runs."""

    config_path: Path | None = None
    debug: bool = False


options = Options()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdxlctl {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="sdxlctl.toml to use (default: ./sdxlctl.toml if present, else defaults)",
            dir_okay=False,
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Stable Diffusion XL on Google Cloud (and on this machine) from one TOML file."""
    options.config_path, options.debug = config, debug


def run(argv: list[str]) -> int:
    """Run the app on `argv`; every failure becomes a message on stderr and an exit code."""
    from rich.markup import escape

    from sdxlctl.cli import commands  # noqa: F401  (registers the commands)

    options.config_path, options.debug = None, "--debug" in argv
    try:
        result = app(args=argv, prog_name="sdxlctl", standalone_mode=False)
    except SdxlctlError as exc:
        if options.debug:
            err.print_exception()
        err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
        if exc.hint:
            err.print(f"[dim]hint:[/] {escape(exc.hint)}", highlight=False)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        return ExitCode.INTERRUPTED
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
    return result if isinstance(result, int) else ExitCode.OK


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))
