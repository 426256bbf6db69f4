"""The Typer app and its global options: the commands register on it, the runner in app.py runs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from sdxlctl import __version__
from sdxlctl.cli.group import Group

app = typer.Typer(
    name="sdxlctl",
    cls=Group,  # help texts shown as written, flags without <bool>, --debug/--config after the subcommand too
    help="Stable Diffusion XL on Google Cloud (and on this machine) from one TOML file.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,  # tracebacks show locals: secrets; only --debug shows a traceback
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},  # every command inherits -h
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
            envvar="SDXLCTL_CONFIG",  # the env forms of the global options, as gcloud's CLOUDSDK_*
            dir_okay=False,
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", envvar="SDXLCTL_DEBUG", help="show tracebacks")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Stable Diffusion XL on Google Cloud (and on this machine) from one TOML file."""
    options.config_path, options.debug = config, debug
