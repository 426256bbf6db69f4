"""`sdxlctl lora push FILE`: a local LoRA to the first gs:// prefix of [model] lora_sources; and the LoRA part
of `sdxlctl status`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sdxlctl.cli.console import err, out
from sdxlctl.cli.group import Group
from sdxlctl.cli.root import app, options

lora_app = typer.Typer(
    cls=Group,  # help shown as written ([model] keys), flags without <bool>
    help="LoRA adapters: `sdxlctl lora push FILE` puts one where the server may fetch it ([model] lora_sources).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(lora_app, name="lora")

BAR_FROM_BYTES = 16 * 1024 * 1024  # smaller files go in a moment: the spinner says enough


@lora_app.command("push")
def push(
    file: Annotated[Path, typer.Argument(help="the adapter: a .safetensors file (never pickle), at most 1 GB")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask before uploading")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a machine-readable result on stdout")] = False,
) -> None:
    """Check FILE and copy it to the first gs:// prefix of [model] lora_sources as <name>-<sha256>.safetensors.

    The name comes from the bytes: pushing the same file again uploads nothing. Prints the --lora to use.
    """
    from rich.markup import escape

    from sdxlctl import core, loras
    from sdxlctl.config import load_config

    config = load_config(options.config_path)
    prefix = loras.first_gs_prefix(config.model.lora_sources, config.path)
    if not yes and sys.stdin.isatty() and file.is_file():  # a script (no terminal) goes ahead, as gcloud's cp does
        size = file.stat().st_size
        typer.confirm(f"Upload {file.name} ({size / 1e6:.1f} MB) under {prefix}?", abort=True, err=True)
    with _bar(file) as sent:
        pushed = core.lora_push(config, file, sent=sent)
    what = "uploaded" if pushed.uploaded else "already there (the same content), nothing uploaded"
    err.print(f"{escape(file.name)}: {what}", highlight=False)
    if as_json:  # messages stay on stderr: stdout is the JSON alone
        result = {"source": pushed.source, "uploaded": pushed.uploaded, "bytes": pushed.size, "sha256": pushed.sha256}
        out.print_json(json.dumps(result))
        return
    out.print(escape(pushed.source))
    err.print(f'use it: sdxlctl predict "a prompt" --lora {escape(pushed.source)}:1.0', highlight=False)


def _bar(file: Path) -> Any:
    """A transfer bar on stderr for a large file; for a small one, only a spinner."""
    from contextlib import contextmanager

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    @contextmanager
    def bar() -> Any:
        large = file.is_file() and file.stat().st_size >= BAR_FROM_BYTES
        if not large:
            with err.status(f"pushing {file.name}"):
                yield lambda done, total: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=err, transient=True) as progress:
            task = progress.add_task(f"pushing {file.name}", total=file.stat().st_size)
            yield lambda done, total: progress.update(task, completed=done, total=total)

    return bar()


def show_status(lora: dict[str, Any]) -> None:
    """The LoRA lines under `sdxlctl status`'s table (text; the JSON carries the same object)."""
    from rich.markup import escape

    sources = ", ".join(lora["sources"]) or "none (requests may name only preloaded adapters)"
    out.print(f"[bold]LoRA[/] allowed sources: {escape(sources)}")
    out.print(f"     preloaded: {escape(', '.join(lora['preloaded']) or 'none')}")
    cached = lora.get("cached")
    if cached is None:
        return
    if not cached:
        out.print("     cached on the server: none yet")
        return
    out.print("     cached on the server (most recent first):")
    for entry in cached:
        size = entry.get("bytes")
        # The server lists a preloaded adapter by its name; a local file has no disk-cache size to show.
        said = ["preloaded"] if entry.get("adapter") in lora["preloaded"] else []
        said += [f"{size / 1e6:.1f} MB"] if isinstance(size, int | float) and not isinstance(size, bool) else []
        said += ["in memory"] if entry.get("in_memory") else []
        out.print(f"       {escape(str(entry.get('adapter')))} ({', '.join(said) or 'on disk'})")
