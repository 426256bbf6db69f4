"""The commands: each parses, calls one core function, renders the result."""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sdxlctl.cli.console import err, progress
from sdxlctl.cli.root import app, options
from sdxlctl.gpus import GPUS
from sdxlctl.inputs import REFINE, SCHEDULERS, SECOND_ORDER, spelled

if TYPE_CHECKING:
    from sdxlctl.config import Config
    from sdxlctl.state import StateStore

# Each command imports what it needs when it runs: `sdxlctl --help` loads neither pydantic nor httpx.


def _context() -> tuple[Config, StateStore]:
    from sdxlctl.config import load_config
    from sdxlctl.state import StateStore

    config = load_config(options.config_path)
    return config, StateStore(config.home)


# --gpu's choices: the keys of the one GPU table (a plain dict, cheap to import at start-up).
Gpu = StrEnum("Gpu", {key.replace("-", "_"): key for key in GPUS})  # type: ignore[misc]
# Named in the help text, where they wrap between words, not as a <t4|l4|...> metavar cut mid-name at 80 columns.
GPU_CHOICES = ", ".join(GPUS)


SLOW_SCHEDULERS = ", ".join(spelled(name) for name in SECOND_ORDER)


def _named(names: tuple[str, ...]) -> tuple[Callable[[str | None], str | None], Callable[[str], list[str]]]:
    """--scheduler's and --refine's check and completion, from the one table in sdxlctl/inputs.py.

    Offered hyphenated; taken in any case and with the server's underscores too (`sdxlctl cost` and the
    server's errors spell them dpmpp_2m_karras), so a name copied from either works. Returns the server's name.
    """

    def check(value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip().lower().replace("-", "_")
        if name not in names:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(spelled(n) for n in names)}")
        return name

    def complete(incomplete: str) -> list[str]:
        return [spelled(n) for n in names if spelled(n).startswith(incomplete.lower().replace("_", "-"))]

    return check, complete


_check_scheduler, _complete_scheduler = _named(SCHEDULERS)
_check_refine, _complete_refine = _named(REFINE)


def _open_fraction(value: float | None) -> float | None:
    """--high-noise-frac: strictly between 0 and 1 (either end would leave one model no step)."""
    if value is not None and not 0 < value < 1:
        raise typer.BadParameter(f"{value:g} is not between 0 and 1 (e.g. 0.8: the base does 80% of the steps)")
    return value


def _strength(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"{value:g} is not in 0 < strength <= 1 (1 repaints all, 0.3 keeps most)")
    return value


class Format(StrEnum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


def style_names() -> list[str] | None:
    """The 17 presets the model server knows, and none; None in a cloud-only install (the server then checks)."""
    from sdxlctl.cli.styles import presets

    found = presets()
    return None if found is None else ["none", *(preset["id"] for preset in found)]


def _say_ignored(config: Config, command: str, given: dict[str, bool]) -> None:
    """One line for each given option that the configured target ignores: never taken in silence."""
    from rich.markup import escape

    from sdxlctl import core

    for line in core.ignored_options(config, command, [option for option, on in given.items() if on]):
        err.print(f"[yellow]note:[/] {escape(line)}", soft_wrap=True)


def _complete_style(incomplete: str) -> list[str]:
    return [name for name in style_names() or [] if name.startswith(incomplete)]


def _check_style(value: str | None) -> str | None:
    names = style_names()
    if value is not None and names is not None and value not in names:
        raise typer.BadParameter(f"unknown style {value!r}; choose from {', '.join(names)}")
    return value


def _multiple_of_8(value: int | None) -> int | None:
    if value is not None and value % 8:
        raise typer.BadParameter(f"{value} is not a multiple of 8 (e.g. {value - value % 8 or 8})")
    return value


Json = Annotated[bool, typer.Option("--json", help="print a machine-readable result on stdout")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]


DryRun = Annotated[bool, typer.Option("--dry-run", help="print the plan (with machine, GPU and cost) and call nothing")]


@app.command()
def build(
    local: Annotated[
        bool, typer.Option("--local", help="build with a local Docker engine instead of Cloud Build")
    ] = False,
    dry_run: DryRun = False,
    as_json: Json = False,
) -> None:
    """Build the model-server image (Cloud Build), unless one of the same sources exists."""
    from sdxlctl import core
    from sdxlctl.cli import render

    config, store = _context()
    with progress("building") as update:
        result = core.build(config, store, docker=local, dry_run=dry_run, progress=update, on_log=render.log_line)
    render.outcome(result, "image", as_json=as_json, command="build", dry_run=dry_run)


@app.command()
def upload(dry_run: DryRun = False, as_json: Json = False) -> None:
    """Upload the image as a Vertex AI Model (a new version when it changed); nothing to do on cloudrun."""
    from sdxlctl import core
    from sdxlctl.cli import render

    config, store = _context()
    with progress("uploading") as update:
        result = core.upload(config, store, dry_run=dry_run, progress=update)
    render.outcome(result, "model", as_json=as_json, command="upload", dry_run=dry_run)


@app.command()
def deploy(
    gpu: Annotated[
        Gpu | None, typer.Option(metavar="<gpu>", help=f"{GPU_CHOICES} (cloudrun: l4 only), overrides [deploy] gpu")
    ] = None,
    dry_run: DryRun = False,
    as_json: Json = False,
) -> None:
    """Start the model server (target local), deploy it on a GPU: an endpoint (vertex), an L4 service (cloudrun)."""
    from sdxlctl import core
    from sdxlctl.cli import render

    config, store = _context()
    _say_ignored(config, "deploy", {"--gpu": gpu is not None})
    if gpu is not None:
        config = config.model_copy(update={"deploy": config.deploy.model_copy(update={"gpu": gpu.value})})
    with progress("deploying") as update:
        result = core.deploy(config, store, dry_run=dry_run, progress=update)
    estimate = core.deploy_cost(config) if as_json and dry_run else None  # the plan's cost, in the JSON
    cost = estimate.as_dict() if estimate else None
    render.outcome(result, render.deployed_label(config), as_json=as_json, command="deploy", dry_run=dry_run, cost=cost)


@app.command()
def predict(
    prompt: Annotated[str, typer.Argument(help="what to draw")],
    output: Annotated[Path, typer.Option("--output", "-o", help="image file; more images: out-1.png, ...")] = Path(
        "out.png"
    ),
    num_images: Annotated[
        int, typer.Option("--num-images", "-n", min=1, help="images to make, at most the config's max_images")
    ] = 1,
    negative: Annotated[str | None, typer.Option("--negative", help="what not to draw")] = None,
    seed: Annotated[int | None, typer.Option(min=0, max=2**32 - 1, help="seed of the first image")] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=150, help="denoising steps (server default 30)")] = None,
    guidance: Annotated[float | None, typer.Option(min=0, max=30, help="guidance scale (default 5)")] = None,
    width: Annotated[int | None, typer.Option(min=64, max=2048, callback=_multiple_of_8, help="pixels")] = None,
    height: Annotated[int | None, typer.Option(min=64, max=2048, callback=_multiple_of_8, help="pixels")] = None,
    style: Annotated[
        str | None,
        typer.Option(
            autocompletion=_complete_style, callback=_check_style, help="style preset: `sdxlctl styles` lists them"
        ),
    ] = None,
    output_format: Annotated[
        Format | None, typer.Option("--format", help="png, jpeg or webp (default: from the -o extension)")
    ] = None,
    quality: Annotated[int | None, typer.Option(min=1, max=100, help="jpeg/webp quality")] = None,
    image: Annotated[
        Path | None, typer.Option(help="input image (PNG, JPEG, WebP, ...): image-to-image, or inpainting with --mask")
    ] = None,
    mask: Annotated[Path | None, typer.Option(help="inpainting mask for --image: white is repainted")] = None,
    strength: Annotated[
        float | None,
        typer.Option(callback=_strength, help="how much of --image to repaint, 0-1 (default 0.8; 1 with --mask)"),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            metavar="<name>",
            callback=_check_scheduler,
            autocompletion=_complete_scheduler,
            help=f"sampler: {', '.join(spelled(n) for n in SCHEDULERS)} (default: the model's, euler); "
            f"{SLOW_SCHEDULERS} take twice the time per step",
        ),
    ] = None,
    refine: Annotated[
        str | None,
        typer.Option(
            metavar="<mode>",
            callback=_check_refine,
            autocompletion=_complete_refine,
            help="run the refiner: none, expert-ensemble, base-image ([model] refiner)",
        ),
    ] = None,
    high_noise_frac: Annotated[
        float | None,
        typer.Option(callback=_open_fraction, help="expert-ensemble: the base's share of the steps (default 0.8)"),
    ] = None,
    refine_steps: Annotated[
        int | None, typer.Option(min=1, max=150, help="base-image: the refiner's steps (default --steps)")
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SOURCE[:SCALE]",
            help="a LoRA adapter, up to 3 times: a [model] loras name, gs://BUCKET/FILE.safetensors, "
            "hf://ORG/REPO[/FILE.safetensors] or ORG/REPO (under [model] lora_sources); "
            "SCALE -4..4, default 1: --lora pixel-art:0.8",
        ),
    ] = None,
    as_json: Json = False,
) -> None:
    """Generate images with the deployment: sdxlctl predict "a red fox in snow" -o fox.png

    From an image: --image in.png [--strength 0.6]; inpainting: --image in.png --mask mask.png.
    """
    from sdxlctl import core
    from sdxlctl.cli import render
    from sdxlctl.errors import UsageError
    from sdxlctl.inputs import ModeInputs
    from sdxlctl.loras import parse_flags

    adapters = parse_flags(lora or [])  # before anything is read or sent
    config, store = _context()
    if num_images > config.model.max_images:  # the server's own limit, so refused here before any request
        raise UsageError(
            f"--num-images {num_images} is more than [model] max_images = {config.model.max_images}",
            hint="ask for fewer, or raise max_images in the [model] section of sdxlctl.toml and deploy again",
        )
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
        modes=ModeInputs(
            image=image,
            mask=mask,
            strength=strength,
            scheduler=scheduler,
            refine=refine,
            high_noise_frac=high_noise_frac,
            refine_steps=refine_steps,
        ),
        adapters=adapters,
    )
    with progress("generating") as update:
        result = core.predict(config, store, request, progress=update)
    render.predicted(result, as_json=as_json)


@app.command("ui-deploy")
def ui_deploy(
    public: Annotated[bool, typer.Option("--public", help="anyone with the URL may use it (default: private)")] = False,
    dry_run: DryRun = False,
    as_json: Json = False,
) -> None:
    """Start the Gradio UI (target local) or deploy it to Cloud Run (targets vertex and cloudrun)."""
    from sdxlctl import core
    from sdxlctl.cli import render

    config, store = _context()
    _say_ignored(config, "ui-deploy", {"--public": public})
    with progress("deploying the UI") as update:
        result = core.ui_deploy(config, store, public=public, dry_run=dry_run, progress=update, on_log=render.log_line)
    render.outcome(result, "url", as_json=as_json, command="ui-deploy", dry_run=dry_run)


@app.command()
def teardown(
    yes: Yes = False,
    images: Annotated[bool, typer.Option("--images", help="also the container images")] = False,
    dry_run: DryRun = False,
    as_json: Json = False,
) -> None:
    """Stop and delete everything sdxlctl created for this deployment, and nothing else."""
    from sdxlctl import core
    from sdxlctl.cli import render

    config, store = _context()
    _say_ignored(config, "teardown", {"--images": images})
    with progress("finding what to tear down") as update:
        plan = core.teardown_plan(config, store, images=images, dry_run=dry_run, progress=update)
    if isinstance(plan, core.StepResult) or (dry_run and not plan.empty):  # a dry run's plan
        render.outcome(plan, as_json=as_json, command="teardown", dry_run=True)
        return
    if plan.empty:
        if not dry_run:
            core.teardown(config, store, plan)  # forgets stale records of resources deleted by hand
        err.print(f"nothing to tear down for {config.name!r}")
        if as_json:
            render.outcome(plan, as_json=True, command="teardown", dry_run=dry_run)
        return
    render.removal(plan)
    _confirm(yes)
    with progress("tearing down") as update:
        result = core.teardown(config, store, plan, progress=update)
    render.outcome(result, as_json=as_json, command="teardown")
    if result.failed:
        raise typer.Exit(1)


def _confirm(yes: bool) -> None:
    from sdxlctl.errors import UsageError

    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("teardown deletes the above and needs confirmation", hint="pass --yes")
    typer.confirm("Tear these down?", abort=True, err=True)


@app.command()
def status(as_json: Json = False) -> None:
    """What exists now, where, and since when."""
    from sdxlctl import core
    from sdxlctl.cli import render

    config, store = _context()
    rows = core.status(config, store)
    render.status(config, rows, as_json=as_json, lora=core.lora_status(config, rows))
