"""`sdxlctl init`: write a commented sdxlctl.toml (the documented example, every key explained) with the project,
region, GPU and target given as flags or asked for, as `gcloud init` asks on a terminal and never in a pipe."""

from __future__ import annotations

import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from sdxlctl.cli.commands import GPU_CHOICES, Gpu
from sdxlctl.cli.console import err, out
from sdxlctl.cli.root import app, options

TEMPLATE = Path(__file__).resolve().parents[1] / "example.toml"  # the repository's sdxlctl.toml, shipped
PROJECT_ID = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")  # Google Cloud's rule for a project id
REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")


class TargetName(StrEnum):
    local = "local"
    vertex = "vertex"
    cloudrun = "cloudrun"


CLOUD = ("vertex", "cloudrun")  # the targets that need a project, a region and a GPU


@app.command()
def init(
    project: Annotated[str | None, typer.Option(help="Google Cloud project id, [gcp] project")] = None,
    region: Annotated[
        str | None, typer.Option(help="region of the endpoint or the Cloud Run service, [gcp] region")
    ] = None,
    gpu: Annotated[Gpu | None, typer.Option(help="the GPU of each replica, [deploy] gpu (cloudrun: l4 only)")] = None,
    target_name: Annotated[
        TargetName | None,
        typer.Option("--target", help="local (this machine, the default), vertex (Vertex AI) or cloudrun (Cloud Run)"),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="ask nothing: defaults for what no flag gives")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
) -> None:
    """Write a commented sdxlctl.toml here (or at --config): every key explained, the given values set."""
    from sdxlctl.config import CONFIG_NAME, gcloud_project
    from sdxlctl.errors import UsageError

    path = options.config_path or Path(CONFIG_NAME)
    if path.exists() and not force:
        raise UsageError(f"{path} exists; init never overwrites it", hint="pass --force to replace it, or edit it")
    ask = not yes and sys.stdin.isatty()
    target = target_name.value if target_name else None
    if target is None:
        target = _ask("target (local, vertex or cloudrun)", "local") if ask else "local"
    if target not in ("local", *CLOUD):
        raise UsageError(f"target {target!r}: choose local, vertex or cloudrun")
    if project is None:
        known = gcloud_project()  # offered, never taken unasked: the project is who pays
        project = _ask("Google Cloud project id", known) if ask and target in CLOUD else ""
    if region is None:
        region = _ask("region", "us-central1") if ask and target in CLOUD else "us-central1"
    # Cloud Run offers one GPU: nothing to ask
    gpu_key = gpu.value if gpu else (_ask(f"GPU ({GPU_CHOICES})", "l4") if ask and target == "vertex" else "l4")
    _check(project, region, gpu_key)
    if target == "cloudrun":
        _check_cloudrun(region, gpu_key)
    text = fill(
        TEMPLATE.read_text(encoding="utf-8"),
        {("", "target"): target, ("gcp", "project"): project, ("gcp", "region"): region, ("deploy", "gpu"): gpu_key},
    )
    _write(path, text)
    out.print(str(path), highlight=False)
    err.print(f"wrote {path} (target {target}); `sdxlctl check` shows what is missing", highlight=False)
    if target in CLOUD and not project:
        err.print(
            f"[yellow]note:[/] [gcp] project is empty: set it before any step on target {target}", highlight=False
        )


def fill(template: str, values: dict[tuple[str, str], str]) -> str:
    """The template with each (section, key) set to its value; every comment, and every other key, kept."""
    section, lines = "", []
    for line in template.splitlines(keepends=True):
        header = re.match(r"^\[([a-z_]+)\]", line)
        if header:
            section = header.group(1)
        match = re.match(r'^(?P<key>[a-z_]+)(?P<eq>\s*=\s*)(?P<value>"[^"]*"|\S+)(?P<rest>.*)$', line, re.DOTALL)
        if match and (section, match["key"]) in values:
            value = f'"{values[(section, match["key"])]}"'
            rest = match["rest"]
            # Keep the comment's column where the new value fits before it.
            pad = len(match["value"]) - len(value)
            if rest.startswith(" ") and rest.strip().startswith("#"):
                rest = " " * max(1, len(rest) - len(rest.lstrip(" ")) + pad) + rest.lstrip(" ")
            line = f"{match['key']}{match['eq']}{value}{rest}"
        lines.append(line)
    return "".join(lines)


def _ask(question: str, default: str) -> str:
    return str(typer.prompt(question, default=default, err=True, show_default=bool(default))).strip()


def _check(project: str, region: str, gpu_key: str) -> None:
    from sdxlctl.errors import UsageError
    from sdxlctl.gpus import GPUS

    if project and not PROJECT_ID.match(project):
        raise UsageError(
            f"--project {project!r} is not a Google Cloud project id",
            hint="6-30 lowercase letters, digits or '-', starting with a letter (`gcloud projects list` shows yours)",
        )
    if not REGION.match(region):
        raise UsageError(f"--region {region!r} is not a region name", hint="e.g. us-central1, europe-west4")
    if gpu_key not in GPUS:
        raise UsageError(f"--gpu {gpu_key!r}: choose one of {', '.join(GPUS)}")


def _check_cloudrun(region: str, gpu_key: str) -> None:
    """What Cloud Run cannot run, refused naming the flag (the config's own check would name a temporary file)."""
    from sdxlctl.errors import UsageError
    from sdxlctl.gpus import CLOUD_RUN_GPU

    problem = CLOUD_RUN_GPU.gpu_problem(gpu_key)
    if problem:
        raise UsageError(f"--gpu {gpu_key}: {problem}", hint="drop --gpu, or choose --target vertex")
    problem = CLOUD_RUN_GPU.region_problem(region)
    if problem:
        raise UsageError(f"--region {region}: {problem}")


def _write(path: Path, text: str) -> None:
    """Written whole or not at all, and checked by the same loader every command uses."""
    from sdxlctl.config import load_config

    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.init-{os.getpid()}")
    try:
        partial.write_text(text, encoding="utf-8")
        load_config(partial, environ={})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
