"""`sdxlctl cost`'s output: the compare table (Vertex AI's GPUs and Cloud Run's L4) and target cloudrun's estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from sdxlctl.cli import render
from sdxlctl.cli.console import err, out
from sdxlctl.steps import plural

if TYPE_CHECKING:
    from sdxlctl.batch.door import BatchEstimate
    from sdxlctl.config import Config
    from sdxlctl.core import CloudRunEstimate, Compared, Estimate

RUN_CAVEAT = (
    "An estimate: list prices of the table's date, no discounts or taxes; Cloud Run bills each instance per "
    "second (rounded up to 100 ms) from its start to its shutdown, idle included."
)
VERTEX_ALL_DAY = "Vertex AI bills each deployed replica around the clock, busy or not"
HOURS_PER_DAY = 24
RUN_PARTS = {"gpu": "GPU (L4)", "vcpu": "vCPU", "ram": "memory", "storage": "images (storage)", "total": "[bold]total"}


def instances(low: int, high: int) -> str:
    """1 instance, 0..3 instances (scale to zero)."""
    if low == high:
        return plural(low, "instance")
    return f"{low}..{high} instances" + (" (scale to zero)" if low == 0 else "")


def hours(value: float) -> str:
    return plural(value, "busy hour")


def estimate(result: Estimate | CloudRunEstimate, *, as_json: bool, busy_hours_per_day: float = HOURS_PER_DAY) -> None:
    """The estimate of the configured target: Vertex AI's (render.estimate) or Cloud Run's at the duty cycle."""
    from sdxlctl.core import CloudRunEstimate

    if not isinstance(result, CloudRunEstimate):
        render.estimate(result, as_json=as_json)
        if busy_hours_per_day != HOURS_PER_DAY:  # never taken in silence
            err.print(f"[yellow]note:[/] --busy-hours-per-day prices Cloud Run (cost --compare): {VERTEX_ALL_DAY}")
        return
    result = result.at(busy_hours_per_day)
    if as_json:
        render._json(result.as_dict())
        err.print(f"[dim]{RUN_CAVEAT}[/]")
        return
    row = result.row
    title = (
        f"Cloud Run: 1 L4, {row.cpu} vCPU, {row.memory_gib} GiB in {result.region}, {plural(result.days, 'day')}, "
        f"{instances(*result.replicas)}, {hours(result.busy_hours_per_day)} a day"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("USD", justify="right")
    table.add_column(f"USD at {plural(result.max_instances, 'instance')} all day", justify="right")
    for part, label in RUN_PARTS.items():
        table.add_row(label, f"{getattr(result.low, part):,.2f}", f"{getattr(result.high, part):,.2f}")
    out.print(table)
    hourly = result.machine_per_hour
    idle = "nothing while idle" if not row.min_instances else f"{plural(row.min_instances, 'instance')} always up"
    out.print(
        f"one instance: {render.usd_per_hour(hourly)} USD/hour while up; idle: {result.idle_usd_per_day:,.2f} "
        f"USD/day ({idle})",
        soft_wrap=True,
    )
    out.print(_speed(result), soft_wrap=True)
    err.print(f"[dim]{RUN_CAVEAT} Prices: {result.origin}, {result.table_date}.[/]")
    for note in result.unverified:
        err.print(f"[yellow]unverified:[/] {escape(note)}")
    for note in result.notes:
        err.print(escape(note))


def _speed(result: CloudRunEstimate) -> str:
    row = result.row
    seconds = f"{row.latency.seconds:.1f} s/image" + ("" if row.latency.measured else " (estimated)")
    if row.images_per_hour is None:
        return f"at full load: {seconds}, past the {row.timeout_s} s request timeout: no images come out"
    per_1000 = row.usd_per_1000_images
    money = "" if per_1000 is None else f", {per_1000:,.2f} USD per 1000 images"
    return (
        f"at full load: {seconds}, {row.images_per_hour:,.0f} images/hour; "
        f"at {hours(row.busy_hours_per_day)} a day{money}"
    )


def comparison(
    result: Compared, steps: int, *, optimize: str = "auto", as_json: bool, size: tuple[int, int] = (1024, 1024)
) -> None:
    """Vertex AI's GPU options (one replica) and Cloud Run's L4 at the duty cycle, side by side."""
    run, region = result.cloud_run, result.cloud_run.region
    if as_json:
        summary = {"region": region, "steps": steps, "width": size[0], "height": size[1], "optimize": optimize}
        rows = {"gpus": [r.as_dict() for r in result.gpus], "cloud_run": run.as_dict()}
        render._json({**summary, "estimate": True, **rows})
        return
    level = "" if optimize in ("auto", "compile") else f", SDXL_OPTIMIZE={optimize}"
    title = f"GPUs in {region}, {size[0]}x{size[1]} at {steps} steps{level}, one replica"
    table = Table(title=title, title_justify="left")
    # Narrow (80 columns, or piped) drops the machine (the estimate names it) so that no figure is cut short.
    wide = out.width >= render.WIDE
    columns = ["gpu", *(["machine"] if wide else []), "$/hour", "$/day", "s/image", "images per hour", "$/1000 images"]
    for column in [*columns, "fits 60 s"]:
        left = column in ("gpu", "machine", "fits 60 s")
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    for row in result.gpus:
        hourly = row.usd_per_hour
        seconds = f"{'>' if row.latency.lower_bound else ''}{row.latency.seconds:.1f}"
        seconds += "" if row.latency.measured else "*"
        fits = "[green]yes, 2x[/]" if row.fits_with_margin else "[yellow]yes[/]" if row.fits_shared else "[red]no[/]"
        cells = {
            "gpu": row.option.key,
            "machine": row.option.machine_type,
            "$/hour": "-" if hourly is None else render.usd_per_hour(hourly),
            "$/day": "-" if hourly is None else f"{hourly * 24:,.2f}",
            "s/image": seconds,
            "images per hour": "-" if row.images_per_hour is None else f"{row.images_per_hour:,.0f}",
            "$/1000 images": "-" if row.usd_per_1000_images is None else f"{row.usd_per_1000_images:,.2f}",
        }
        table.add_row(*(cells[column] for column in columns), fits)
    table.add_section()
    fits = "[green]yes[/]" if run.fits_timeout else "[red]no[/]"  # its limit is its request timeout, not 60 s
    table.add_row(*(_run_cells(result)[column] for column in columns), fits)
    out.print(table)
    err.print(
        "[dim]* estimated from the work per image and the GPU's fp16 rate; others measured. Fits 60 s: a shared "
        "endpoint's limit (2x: with a 2x margin); -: over it, no images come out. $/1000 images at full load. "
        "An estimate of list prices.[/]"
    )
    err.print(escape(_run_line(result)))


def _run_cells(result: Compared) -> dict[str, str]:
    run = result.cloud_run

    def usd(value: float | None, text: str) -> str:
        return "-" if value is None else text.format(value)

    return {
        "gpu": "run l4",
        "machine": f"{run.cpu} vCPU, {run.memory_gib} GiB",
        "$/hour": usd(run.usd_per_hour, "{:,.4f}"),
        "$/day": usd(run.usd_per_day, "{:,.2f}"),
        "s/image": f"{run.latency.seconds:.1f}" + ("" if run.latency.measured else "*"),
        "images per hour": usd(run.images_per_hour, "{:,.0f}"),
        "$/1000 images": usd(run.usd_per_1000_images, "{:,.2f}"),
    }


def _run_line(result: Compared) -> str:
    """What the Cloud Run row's figures mean: its duty cycle, its idle cost, its own time limit."""
    run = result.cloud_run
    if run.usd_per_hour is None:
        return f"run l4: Cloud Run's L4, not priced here: {run.problem}"
    idle = "0 at min 0 instances" if not run.min_instances else f"{plural(run.min_instances, 'instance')} always up"
    return (
        f"run l4: Cloud Run's L4 ({run.cpu} vCPU, {run.memory_gib} GiB, min {run.min_instances}): $/hour while "
        f"an instance is up; $/day and $/1000 images at {hours(run.busy_hours_per_day)} a day "
        f"(--busy-hours-per-day); idle {run.idle_usd_per_day:,.2f} USD/day ({idle}); fits: within its "
        f"{run.timeout_s} s request timeout; billed per instance-second, rounded up to 100 ms"
    )


# ---------------------------------------------------------------- cost --images: a batch

BATCH_CAVEAT = (
    "An estimate: list prices of the table's date, no discounts or taxes; Vertex AI batch prediction bills each "
    "replica's node hours from its start to the job's end, at the online rate card (Spot's with --spot)."
)


def paired(*, images: int | None, replicas: int | None, compare: bool) -> None:
    """`cost`'s batch flags only with --images, and --compare only without: a flag that would be dropped is refused
    (`cost --replicas 3` priced one replica's day)."""
    from sdxlctl.errors import UsageError

    if images is None and replicas is not None:
        raise UsageError(
            "--replicas prices a batch's replicas: it goes with --images N", hint="sdxlctl cost --images N --replicas R"
        )
    if images is not None and compare:
        raise UsageError("--compare prices a day of every GPU; --images prices one batch: give one of them")


def flagged(config: Config, region: str | None, spot: bool | None) -> Config:
    """The config with `cost`'s --region and --spot/--no-spot laid over it: --spot prices the online replicas
    ([deploy] spot) and a batch's (--images, [batch] spot) on Spot VMs."""
    gcp = config.gcp if region is None else config.gcp.model_copy(update={"region": region})
    if spot is None:
        return config.model_copy(update={"gcp": gcp})
    deploy, batch = (part.model_copy(update={"spot": spot}) for part in (config.deploy, config.batch))
    return config.model_copy(update={"gcp": gcp, "deploy": deploy, "batch": batch})


def batch(result: BatchEstimate, *, as_json: bool, size: tuple[int, int] = (1024, 1024)) -> None:
    """`cost --images N`: what a batch of N images costs, as `sdxlctl batch --dry-run` prices it."""
    from sdxlctl.gpus import gpu

    if as_json:
        render._json(result.as_dict())
        err.print(f"[dim]{BATCH_CAVEAT}[/]")
        return
    option = gpu(result.gpu)
    capacity = "Spot VMs" if result.spot else "on demand"
    title = (
        f"A batch of {result.images:,} {size[0]}x{size[1]} images on {option.label} "
        f"({plural(result.replicas, 'replica')}, {option.machine_type}, {capacity}) in {result.region}"
    )
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for label, value in _batch_rows(result):
        table.add_row(label, value)
    out.print(table)
    err.print(f"[dim]{BATCH_CAVEAT}[/]")
    for note in result.notes:
        err.print(escape(note), soft_wrap=True)


def _batch_rows(result: BatchEstimate) -> list[tuple[str, str]]:
    measured = "" if result.seconds_measured else " (estimated)"
    starts = f"{plural(result.replicas, 'start')} of {result.replica_start_h * 60:g} min in it"
    return [
        ("seconds per image", f"{result.seconds_per_image:.2f}{measured}"),
        ("batch size", f"{plural(result.batch_size, 'instance')} a request"),
        ("replica hours", f"{result.replica_hours:,.2f} ({starts})"),
        ("hours until done", f"{result.wall_hours:,.2f}"),
        ("USD per replica hour", render.usd_per_hour(result.usd_per_replica_hour)),
        ("[bold]USD", f"[bold]{result.usd:,.2f}"),
    ]
