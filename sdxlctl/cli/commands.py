"""The commands: each parses, calls one core function, renders the result."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sdxlctl.cli.app import app, options
from sdxlctl.cli.console import err, progress

if TYPE_CHECKING:
    from sdxlctl.config import Config
    from sdxlctl.state import StateStore

# Each command imports what it needs when it runs: `sdxlctl --help` loads neither pydantic nor httpx.


def _context() -> tuple[Config, StateStore]:
    from sdxlctl.config import load_config
    from sdxlctl.state import StateStore

    config = load_config(options.config_path)
    return config, StateStore(config.home)


class Gpu(StrEnum):
    t4 = "t4"
    l4 = "l4"
    a100 = "a100"
    a100_80 = "a100-80"
    h100 = "h100"
    h200 = "h200"


class Format(StrEnum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


def style_names() -> list[str]:
    """The 17 presets the model server knows, read from its data file (no server code is imported)."""
    from importlib.resources import files

    data = json.loads(files("sdxl_server").joinpath("styles.json").read_text(encoding="utf-8"))
    return ["none", *(entry["id"] for entry in data["styles"])]


def _complete_style(incomplete: str) -> list[str]:
    return [name for name in style_names() if name.startswith(incomplete)]


def _check_style(value: str | None) -> str | None:
    if value is not None and value not in style_names():
        raise typer.BadParameter(f"unknown style {value!r}; choose from {', '.join(style_names())}")
    return value


def _multiple_of_8(value: int | None) -> int | None:
    if value is not None and value % 8:
        raise typer.BadParameter(f"{value} is not a multiple of 8 (e.g. {value - value % 8 or 8})")
    return value


Json = Annotated[bool, typer.Option("--json", help="print a machine-readable result on stdout")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]


@app.command()
def build() -> None:
    """Build the model-server image (Cloud Build)."""
    from sdxlctl import core

    config, _ = _context()
    if config.target == "local":
        err.print("target local runs the server from this checkout: there is no image to build")
        return
    raise core.not_yet("build", config)


@app.command()
def upload() -> None:
    """Upload the image as a Vertex AI Model."""
    from sdxlctl import core

    config, _ = _context()
    if config.target == "local":
        err.print("target local has no model registry: nothing to upload")
        return
    raise core.not_yet("upload", config)


@app.command()
def deploy(
    gpu: Annotated[Gpu | None, typer.Option(help="GPU for target vertex (overrides [deploy] gpu)")] = None,
) -> None:
    """Start the model server (target local) or deploy it to an endpoint on a GPU (target vertex)."""
    from sdxlctl import core
    from sdxlctl.cli import render

    config, store = _context()
    if gpu is not None:
        config = config.model_copy(update={"deploy": config.deploy.model_copy(update={"gpu": gpu.value})})
    with progress("deploying") as update:
        result = core.deploy(config, store, progress=update)
    render.deployed(result)


@app.command()
def predict(
    prompt: Annotated[str, typer.Argument(help="what to draw")],
    output: Annotated[Path, typer.Option("--output", "-o", help="image file; more images: out-1.png, ...")] = Path(
        "out.png"
    ),
    num_images: Annotated[int, typer.Option("--num-images", "-n", min=1, max=16, help="images to make")] = 1,
    negative: Annotated[str | None, typer.Option("--negative", help="what not to draw")] = None,
    seed: Annotated[int | None, typer.Option(min=0, max=2**32 - 1, help="seed of the first image")] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=150, help="denoising steps (server default 30)")] = None,
    guidance: Annotated[float | None, typer.Option(min=0, max=30, help="guidance scale (default 5)")] = None,
    width: Annotated[int | None, typer.Option(min=64, max=2048, callback=_multiple_of_8, help="pixels")] = None,
    height: Annotated[int | None, typer.Option(min=64, max=2048, callback=_multiple_of_8, help="pixels")] = None,
    style: Annotated[
        str | None,
        typer.Option(autocompletion=_complete_style, callback=_check_style, help="style preset (see --help-styles)"),
    ] = None,
    output_format: Annotated[
        Format | None, typer.Option("--format", help="png, jpeg or webp (default: from the -o extension)")
    ] = None,
    quality: Annotated[int | None, typer.Option(min=1, max=100, help="jpeg/webp quality")] = None,
    as_json: Json = False,
) -> None:
    """Generate images with the deployment: sdxlctl predict "a red fox in snow" -o fox.png"""
    from sdxlctl import core
    from sdxlctl.cli import render

    config, store = _context()
    request = core.PredictOptions(
        prompt=prompt,
        output=output,
        num_images=num_images,
        negative_prompt=negative,
        seed=seed,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        style=None if style == "none" else style,
        output_format=output_format.value if output_format else None,
        quality=quality,
    )
    with progress("generating"):
        result = core.predict(config, store, request)
    render.predicted(result, as_json=as_json)


@app.command("ui-deploy")
def ui_deploy() -> None:
    """Start the Gradio UI (target local) or deploy it to Cloud Run (target vertex)."""
    from sdxlctl import core

    config, _ = _context()
    raise core.not_yet("ui-deploy", config)


@app.command()
def teardown(yes: Yes = False) -> None:
    """Stop and delete everything sdxlctl created for this deployment, and nothing else."""
    from sdxlctl import core
    from sdxlctl.cli import render
    from sdxlctl.errors import UsageError

    config, store = _context()
    plan = core.teardown_plan(config, store)
    if not plan:
        err.print(f"nothing to tear down for {config.name!r}")
        return
    render.teardown_plan(plan)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("teardown deletes the above and needs confirmation", hint="pass --yes")
        typer.confirm("Tear these down?", abort=True, err=True)
    with progress("tearing down") as update:
        outcomes = core.teardown(config, store, progress=update)
    render.torn_down(outcomes)
    if not all(outcome.ok for outcome in outcomes):
        raise typer.Exit(1)


@app.command()
def cost(
    days: Annotated[float, typer.Option(min=0, help="days to price")] = 1,
    as_json: Json = False,
) -> None:
    """What the config costs per day, broken down, and per 1000 images."""
    from sdxlctl import core

    config, _ = _context()
    raise core.not_yet("cost", config)


@app.command()
def status(as_json: Json = False) -> None:
    """What exists now, where, and since when."""
    from sdxlctl import core
    from sdxlctl.cli import render

    config, store = _context()
    render.status(config, core.status(config, store), as_json=as_json)
