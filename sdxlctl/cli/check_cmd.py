"""`sdxlctl check`: whether this machine and the project are ready for the configured target, as `sky check`."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import typer

from sdxlctl.cli.console import err, out, progress
from sdxlctl.cli.root import app, options

if TYPE_CHECKING:
    from sdxlctl.steps import Check

MARKS = {"ok": "[green]✓[/]", "fail": "[red]✗[/]", "warn": "[yellow]![/]"}


@app.command()
def check(
    as_json: Annotated[bool, typer.Option("--json", help="print the checks as JSON on stdout")] = False,
) -> None:
    """Is everything the target needs in place? One line per check, with the fix; exit 1 if any fails.

    Targets vertex and cloudrun: credentials, APIs, GPU quota in the region (cloudrun: Cloud Run's L4 quota),
    bucket and registry; target local: the server's and the UI's packages, free ports.
    """
    from sdxlctl import core
    from sdxlctl.config import load_config
    from sdxlctl.state import StateStore

    config = load_config(options.config_path)
    with progress("checking"):
        found = core.check(config, StateStore(config.home))
    failed = [row for row in found if row.status == "fail"]
    if as_json:
        out.print_json(json.dumps({"ok": not failed, "checks": [asdict(row) for row in found]}))
    else:
        _show(found)
    if failed:
        err.print(f"{len(failed)} of {len(found)} checks failed: see the fix under each", highlight=False)
        raise typer.Exit(1)
    err.print(f"all {len(found)} checks passed", highlight=False)


def _show(rows: list[Check]) -> None:
    """One line per check; its fix below it, whole (a command to copy is never wrapped into pieces)."""
    from rich.markup import escape

    width = max(len(row.name) for row in rows)
    for row in rows:
        out.print(f"{MARKS[row.status]} {escape(row.name.ljust(width))}  {escape(row.detail)}", highlight=False)
        if row.fix and row.status != "ok":
            out.print(f"  {' ' * width}  [dim]fix:[/] {escape(row.fix)}", highlight=False)
