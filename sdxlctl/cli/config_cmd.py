"""`sdxlctl config`: the effective config, each value with where it came from (as `gcloud config list`)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from sdxlctl.cli.console import err, out
from sdxlctl.cli.root import app, options

# Where the file came from, by click's source of the global --config option.
FILE_FROM = {"COMMANDLINE": "--config", "ENVIRONMENT": "SDXLCTL_CONFIG"}


@app.command("config")
def show_config(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="print the settings as JSON on stdout")] = False,
) -> None:
    """The effective config: every key, its value, and where it came from (default, file, SDXLCTL_* variable)."""
    from rich.markup import escape
    from rich.table import Table

    from sdxlctl.config import CONFIG_NAME, env_var, settings

    config, rows = settings(options.config_path)
    root = ctx.find_root()
    source = root.get_parameter_source("config")
    file = str(config.path) if config.path else None
    if file is None:
        file_from = None
    elif source is not None and source.name in FILE_FROM:
        file_from = FILE_FROM[source.name]
    else:
        file_from = f"./{CONFIG_NAME}, found in the current folder"
    if as_json:
        data = {
            "file": file,
            "file_from": file_from,
            "settings": [{"key": r.key, "value": r.value, "source": r.source, "env": env_var(r.key)} for r in rows],
        }
        out.print_json(json.dumps(data))
        return
    shown_file = _relative(file) if file else ""
    where = f"{shown_file} ({file_from})" if file else "none: built-in defaults (no ./sdxlctl.toml here)"
    err.print(f"config file: {escape(where)}", highlight=False, soft_wrap=True)
    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("key", "value", "from"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.key, escape(_toml(row.value)), escape(shown_file if row.source == file else row.source))
    out.print(table)
    if not config.gcp.project:
        from sdxlctl.config import gcloud_project

        found = gcloud_project()
        also = f"; gcloud's default project is {found!r}" if found else ""
        err.print(f"[dim]gcp.project is not set (target vertex needs it){escape(also)}[/]", soft_wrap=True)


def _relative(path: str) -> str:
    """The file as the user would name it: relative to the current folder where it is below it."""
    import os

    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _toml(value: Any) -> str:
    """A value as it would be written in sdxlctl.toml."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list):
        return json.dumps(value)
    return str(value)
