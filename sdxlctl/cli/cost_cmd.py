"""`sdxlctl cost`: what the config costs a day, every GPU side by side, or a batch of N images (estimates)."""

from __future__ import annotations

from typing import Annotated

import typer

from sdxlctl.cli.commands import GPU_CHOICES, Gpu, Json, _context, _multiple_of_8
from sdxlctl.cli.root import app

Side = Annotated[
    int, typer.Option(min=64, max=2048, callback=_multiple_of_8, help="pixels of the images priced per image")
]


@app.command()
def cost(
    days: Annotated[float, typer.Option(min=0, help="days to price")] = 1,
    gpu: Annotated[Gpu | None, typer.Option(metavar="<gpu>", help=f"price this GPU ({GPU_CHOICES})")] = None,
    region: Annotated[str | None, typer.Option(help="price this region instead of [gcp] region")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="every GPU side by side: speed, $/1000 images")] = False,
    steps: Annotated[int, typer.Option(min=1, max=150, help="steps per image, for speed and $/1000 images")] = 30,
    width: Side = 1024,
    height: Side = 1024,
    live: Annotated[bool, typer.Option("--live", help="today's prices from the Cloud Billing catalog")] = False,
    busy: Annotated[float, typer.Option("--busy-hours-per-day", min=0, max=24, help="Cloud Run's busy hours/day")] = 24,
    images: Annotated[int | None, typer.Option(min=1, help="price a batch of N images (`sdxlctl batch`)")] = None,
    replicas: Annotated[int | None, typer.Option(min=1, help="with --images: replicas ([batch] max_replicas)")] = None,
    spot: Annotated[bool | None, typer.Option("--spot/--no-spot", help="Spot VMs ([deploy]/[batch] spot)")] = None,
    as_json: Json = False,
) -> None:
    """What the config costs per day, broken down, and per 1000 images; with --images, a batch (estimates)."""
    from sdxlctl import core
    from sdxlctl.batch import door
    from sdxlctl.cli import cost_render, render

    cost_render.paired(images=images, replicas=replicas, compare=compare)  # before the config: a usage error
    config, warn, key = cost_render.flagged(_context()[0], region, spot), render.warning, gpu and gpu.value
    size, pixels = (width, height), width * height
    if images is not None:  # the arithmetic of `sdxlctl batch --dry-run`, through the same door
        table = core.price_table(config, live=live, warn=warn)
        batch = door.cost(
            config, images=images, gpu=key, replicas=replicas, spot=spot, steps=steps, size=size, table=table
        )
        cost_render.batch(batch, as_json=as_json, size=size)
    elif compare:
        rows = core.cost_compare(config, region=region, steps=steps, pixels=pixels, live=live, warn=warn).at(busy)
        cost_render.comparison(rows, steps, optimize=config.model.optimize, as_json=as_json, size=size)
    else:
        estimate = core.cost(
            config, days=days, gpu_key=key, region=region, live=live, warn=warn, steps=steps, pixels=pixels
        )
        cost_render.estimate(estimate, as_json=as_json, busy_hours_per_day=busy)
