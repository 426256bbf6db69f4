"""`sdxlctl batch`: many prompts through Vertex AI batch prediction (target vertex) or the local server."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sdxlctl.cli.commands import (
    GPU_CHOICES,
    SCHEDULERS,
    SLOW_SCHEDULERS,
    DryRun,
    Format,
    Gpu,
    Json,
    Yes,
    _check_scheduler,
    _check_style,
    _complete_scheduler,
    _complete_style,
    _context,
    _multiple_of_8,
    _say_ignored,
    spelled,
)
from sdxlctl.cli.root import app

if TYPE_CHECKING:
    from sdxlctl.batch.door import BatchPlan

REPLICAS = re.compile(r"^\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?$")
MAX_REPLICAS = 100  # Vertex AI's maxReplicaCount, as [batch] max_replicas allows


def _replicas(value: str | None) -> tuple[int, int] | None:
    """--replicas 2 (fixed) or 1..4 (starts with 1, may grow to 4)."""
    if value is None:
        return None
    match = REPLICAS.match(value)
    if not match:
        raise typer.BadParameter(f"{value!r} is not N or MIN..MAX (e.g. 2, or 1..4)")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if not 1 <= low <= high <= MAX_REPLICAS:
        raise typer.BadParameter(f"{value!r}: replicas are 1..{MAX_REPLICAS}, and MIN is at most MAX")
    return low, high


def _check_replicas(value: str | None) -> str | None:
    _replicas(value)  # refused while click knows the flag, so the error names --replicas
    return value


@app.command()
def batch(
    source: Annotated[
        Path | None, typer.Argument(help="prompts file: .txt (a prompt a line), .jsonl or .csv (prompt column)")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=150, help="denoising steps (server default 30)")] = None,
    guidance: Annotated[float | None, typer.Option(min=0, max=30, help="guidance scale (default 5)")] = None,
    width: Annotated[int | None, typer.Option(min=64, max=2048, callback=_multiple_of_8, help="pixels")] = None,
    height: Annotated[int | None, typer.Option(min=64, max=2048, callback=_multiple_of_8, help="pixels")] = None,
    num_images: Annotated[
        int | None, typer.Option("--num-images", "-n", min=1, help="images a line, at most [model] max_images")
    ] = None,
    output_format: Annotated[Format | None, typer.Option("--format", help="png, jpeg or webp (default jpeg)")] = None,
    quality: Annotated[int | None, typer.Option(min=1, max=100, help="jpeg/webp quality")] = None,
    negative: Annotated[
        str | None, typer.Option("--negative-prompt", help="what not to draw, for every line without its own")
    ] = None,
    style: Annotated[
        str | None,
        typer.Option(
            autocompletion=_complete_style,
            callback=_check_style,
            help="style preset of every line without its own: `sdxlctl styles` lists them",
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            metavar="<name>",
            callback=_check_scheduler,
            autocompletion=_complete_scheduler,
            help=f"sampler: {', '.join(spelled(n) for n in SCHEDULERS)}; {SLOW_SCHEDULERS} take twice the time",
        ),
    ] = None,
    gpu: Annotated[
        Gpu | None, typer.Option(metavar="<gpu>", help=f"{GPU_CHOICES}; default [batch] gpu, else [deploy] gpu")
    ] = None,
    replicas: Annotated[
        str | None,
        typer.Option(
            metavar="N|MIN..MAX",
            callback=_check_replicas,
            help="replicas of the job: 2, or 1..4 ([batch] min/max_replicas)",
        ),
    ] = None,
    spot: Annotated[
        bool | None,
        typer.Option("--spot/--no-spot", help="Spot VMs: cheaper, may be preempted (default [batch] spot)"),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            metavar="DIR|gs://",
            help="where images/ and manifest.jsonl go: a folder (local; default ./batch-<file>/) or a gs:// "
            "prefix (vertex; default [batch] out, else the staging bucket's batch/ folder)",
        ),
    ] = None,
    download: Annotated[
        Path | None, typer.Option(help="vertex: also write the images and manifest.jsonl into this folder")
    ] = None,
    dry_run: DryRun = False,
    attach: Annotated[
        bool, typer.Option("--attach", help="wait for the last job of this deployment (or --job) and collect it")
    ] = False,
    job: Annotated[str | None, typer.Option(help="with --attach: the job's id or full name")] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="run again only the lines the last run of this file failed")
    ] = False,
    yes: Yes = False,
    as_json: Json = False,
) -> None:
    """Generate an image (or -n images) for every line of a prompts file: sdxlctl batch prompts.txt

    Target vertex runs a Vertex AI batch prediction job on the Model `sdxlctl upload` made.

    Target local sends the lines to the local server.

    Every line is checked before anything starts; --dry-run prints the plan and the cost.

    Exit status 1 when the job or any line failed (the manifest lists them).
    """
    from sdxlctl.batch import BatchOptions, door
    from sdxlctl.cli import batch_render
    from sdxlctl.errors import UsageError

    given = _options(source, attach=attach, job=job, retry_failed=retry_failed, dry_run=dry_run)
    parameters = _parameters(
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        num_images=num_images,
        output_format=output_format,
        quality=quality,
        negative=negative,
        style=style,
        scheduler=scheduler,
    )
    config, store = _context()
    _say_ignored(
        config, "batch", {"--gpu": gpu is not None, "--replicas": replicas is not None, "--spot": spot is not None}
    )
    if num_images is not None and num_images > config.model.max_images:  # the server's limit: refused before
        raise UsageError(
            f"--num-images {num_images} is more than [model] max_images = {config.model.max_images}",
            hint="ask for fewer, or raise max_images in the [model] section of sdxlctl.toml and deploy again",
        )
    options = BatchOptions(
        source=given,
        parameters=parameters,
        gpu=gpu.value if gpu else None,
        replicas=_replicas(replicas),
        spot=spot,
        out=out,
        download=download,
        dry_run=dry_run,
        attach=attach,
        job=job,
        retry_failed=retry_failed,
        yes=yes,
    )

    def confirm(plan: BatchPlan) -> bool:
        return _confirm(plan, config.batch.budget_usd)

    with batch_render.Display(num_images=num_images or 1) as display:
        try:
            result = door.run(config, store, options, progress=display.counts, say=display.say, confirm=confirm)
        except door.Declined as declined:
            display.close()
            batch_render.declined(declined)
            raise typer.Exit(1) from None
    code = batch_render.shown(result, as_json=as_json)
    if code:
        raise typer.Exit(code)


def _options(source: Path | None, *, attach: bool, job: str | None, retry_failed: bool, dry_run: bool) -> Path | None:
    """The flags that only go together, refused as one line before the config is even read."""
    from sdxlctl.errors import UsageError

    if attach:
        clash = [flag for flag, on in (("--retry-failed", retry_failed), ("--dry-run", dry_run)) if on]
        if clash:
            raise UsageError(f"--attach waits for a job already started; it takes no {' or '.join(clash)}")
        if source is not None:  # attach picks the newest job, whatever file it ran: a file named here would mislead
            raise UsageError(
                f"--attach waits for this deployment's newest job; it takes no prompts file ({source})",
                hint="sdxlctl batch --attach, or --attach --job ID for another job (`sdxlctl status` lists them)",
            )
        return None
    if job is not None:
        raise UsageError("--job names the job --attach waits for", hint="sdxlctl batch --attach --job JOB")
    if source is None:
        raise UsageError("a prompts file is required", hint="sdxlctl batch prompts.txt (or --attach to wait for a job)")
    return source


def _parameters(**given: Any) -> dict[str, Any]:
    """The shared parameters in the server's names, only those given (the rest: the server's defaults)."""
    names = {
        "steps": "num_inference_steps",
        "guidance": "guidance_scale",
        "width": "width",
        "height": "height",
        "num_images": "num_images",
        "output_format": "output_format",
        "quality": "quality",
        "negative": "negative_prompt",
        "style": "style",  # an instance field: the door gives it to every line without one
        "scheduler": "scheduler",
    }
    parameters: dict[str, Any] = {}
    for flag, value in given.items():
        if value is None or (flag == "style" and value == "none"):
            continue
        parameters[names[flag]] = value.value if isinstance(value, Format) else value
    return parameters


def _confirm(plan: BatchPlan, budget: float) -> bool:
    """Above [batch] budget_usd: the plan, then a question (a script without a terminal must pass --yes)."""
    from sdxlctl.cli import batch_render
    from sdxlctl.errors import UsageError

    batch_render.plan(plan, title=f"over [batch] budget_usd = {budget:g} USD")
    if not sys.stdin.isatty():
        raise UsageError(
            f"the batch is estimated at {plan.estimate.usd:,.2f} USD, over [batch] budget_usd = {budget:g}, "
            "and needs confirmation",
            hint="pass --yes, or raise [batch] budget_usd in sdxlctl.toml",
        )
    return bool(typer.confirm("Start it?", default=False, err=True))
