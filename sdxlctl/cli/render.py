"""Turn core results into text (stderr for people) or JSON (stdout for programs)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from sdxlctl.cli.console import err, out
from sdxlctl.config import Config
from sdxlctl.state import Resource
from sdxlctl.steps import (
    Change,
    DeployResult,
    Notice,
    Outcome,
    PredictResult,
    Removal,
    ResourceStatus,
    StepResult,
    TeardownOutcome,
    TornDown,
    plural,
)

if TYPE_CHECKING:
    from sdxlctl.core import Comparison, Estimate


def duration(seconds: float) -> str:
    """3s, 4m 05s, 2h 03m, 3d 04h."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600:02d}h"


def _json(data: Any) -> None:
    def encode(value: Any) -> Any:
        return value.isoformat() if isinstance(value, datetime) else str(value)

    out.print_json(json.dumps(data, default=encode))


def outcome(
    result: Outcome | Removal,
    label: str = "",
    *,
    as_json: bool = False,
    command: str = "",
    dry_run: bool = False,
    cost: dict[str, Any] | None = None,
) -> None:
    """Any step's result, as its kind is shown; `label` names what a cloud step leaves behind.

    With `as_json`, one JSON object on stdout instead (the plan of a dry run, with its `cost` where given).
    """
    if as_json:
        from sdxlctl.cli import plans

        _json(plans.outcome(command, result, dry_run=dry_run, cost=cost))
        return
    if isinstance(result, Removal):
        removal(result)
    elif isinstance(result, StepResult):
        step(result, label)
    elif isinstance(result, DeployResult):
        deployed(result)
    elif isinstance(result, TornDown):
        torn_down(result.outcomes)
    else:
        notice(result)


def deployed_label(config: Config) -> str:
    """What `deploy` leaves behind, in the target's own word (Cloud Run has services, not endpoints)."""
    return "service" if config.target == "cloudrun" else "endpoint"


def notice(result: Notice) -> None:
    err.print(escape(result.message))


def removal(plan: Removal) -> None:
    """What teardown will remove, before it asks."""
    if plan.resources:
        teardown_plan(plan.resources)
    if plan.changes:
        changes(plan.changes, title="will delete")


def deployed(result: DeployResult) -> None:
    verb = {
        "started": "started",
        "restarted": "restarted (config changed)",
        "unchanged": "already running",
        "resumed": "ready",
    }[result.action]
    err.print(
        f"[green]✓[/] {result.what} {verb} at {result.resource.url} "
        f"(pid {result.resource.details.get('pid')}, {result.seconds:.1f}s)"
    )
    out.print(result.resource.url)


def predicted(result: PredictResult, *, as_json: bool) -> None:
    if as_json:
        _json(
            {
                "paths": [str(p) for p in result.paths],
                "seeds": result.seeds,
                "width": result.width,
                "height": result.height,
                "format": result.output_format,
                "seconds": round(result.seconds, 3),
                "notes": result.notes,
            }
        )
        return
    for note in result.notes:  # what was changed in the input images to send them
        err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    for path, seed in zip(result.paths, result.seeds, strict=True):
        out.print(f"{path}  seed {seed}")
    err.print(
        f"[green]✓[/] {plural(len(result.paths), 'image')}, {result.width}x{result.height} {result.output_format}, "
        f"in {result.seconds:.1f}s"
    )


def status(config: Config, rows: list[ResourceStatus], *, as_json: bool, lora: dict[str, Any] | None = None) -> None:
    if as_json:  # "lora" only when LoRA is on: the output is otherwise as it was
        data = {"deployment": config.name, "target": config.target, "resources": [asdict(row) for row in rows]}
        _json(data | ({"lora": lora} if lora else {}))
        return
    if lora:  # under the table, or under "nothing deployed": what the config allows holds either way
        from sdxlctl.cli.lora_cmd import show_status

        status(config, rows, as_json=False)
        return show_status(lora)
    if not rows:
        err.print(f"nothing deployed for {config.name!r} (target {config.target}); `sdxlctl deploy` starts it")
        return
    # Narrow (80 columns, or piped, where rich assumes 80) drops "since" ("up for" says the same) and
    # lets long cells fold onto more lines: a name or a state is never cut to "re…".
    wide = out.width >= WIDE
    table = Table(title=f"{config.name} ({config.target})", title_justify="left", show_edge=wide, expand=False)
    columns = ["what", "name", "state", "where", "up for"] + (["since"] if wide else []) + ["cost so far"]
    texts = [_status_cells(row) for row in rows]
    room = out.width - 2 * len(columns) - (len(columns) - 1) - (2 if wide else 0)  # padding, rules, edges
    for column, width in _fit(columns, texts, room).items():
        table.add_column(column, overflow="fold", width=width, justify="right" if column == "cost so far" else "left")
    colours = {
        "ready": "green",
        "built": "green",
        "loading": "yellow",
        "starting": "yellow",
        "no model": "yellow",
        "recorded": "dim",
    }
    for row in rows:
        colour = "green" if row.state.startswith(("serving", "ready, ")) else colours.get(row.state, "red")
        colour = colour if row.recorded else "yellow"  # running unseen by this folder: worth a look
        cells = _status_cells(row)
        cells["state"] = f"[{colour}]{escape(row.state)}[/]"
        table.add_row(*(cells[column] for column in columns))
    out.print(table)
    if not all(row.recorded for row in rows):
        err.print(
            "[yellow]not in this folder's state:[/] made from another folder or with a lost state file; "
            "`sdxlctl teardown` removes them (it finds them by label), or run the steps here with the same "
            "config to adopt them (`sdxlctl build`, `upload`, `deploy` reuse what exists)"
        )


WIDE = 120  # columns from which `status` shows every column


def _status_cells(row: ResourceStatus) -> dict[str, str]:
    """The text of each column: cost so far is 0.00 for local things, — where sdxlctl cannot tell."""
    return {
        "what": row.kind,
        "name": escape(row.name + (f" revision {row.details['revision']}" if row.details.get("revision") else "")),
        "state": escape(row.state),
        "where": escape(row.url),
        "up for": "—" if row.uptime_s is None else duration(row.uptime_s),
        "since": row.created_at.strftime("%Y-%m-%d %H:%M UTC"),
        "cost so far": "—" if row.cost_so_far is None else f"{row.cost_so_far:,.2f}",
    }


def _fit(columns: list[str], rows: list[dict[str, str]], room: int) -> dict[str, int]:
    """Widths that fit `room`: the widest of name, state and where gives first, down to its floor (12 for
    names and URLs, which fold; a state's longest word); the short columns stay whole. Rich's own
    shrinking can cut a short column under its width and then widen it back past the screen."""
    widths = {c: max(len(c), *(len(line) for row in rows for line in row[c].splitlines() or [""])) for c in columns}
    floors = dict(widths)
    floors.update({c: min(12, widths[c]) for c in ("name", "where")})
    floors["state"] = max(len("state"), *(_longest_word(row["state"]) for row in rows))
    while sum(widths.values()) > room:
        column = max((c for c in columns if widths[c] > floors[c]), key=widths.__getitem__, default=None)
        if column is None:
            break  # narrower than the floors allow: the terminal wraps the lines
        widths[column] -= 1
    return widths


def _longest_word(text: str) -> int:
    return max((len(word) for word in text.split()), default=0)


def teardown_plan(plan: list[Resource]) -> None:
    err.print("will stop and forget:")
    for resource in plan:
        err.print(f"  {resource.kind:14} {resource.name:24} {resource.url}")


def torn_down(outcomes: list[TeardownOutcome]) -> None:
    for outcome in outcomes:
        mark = "[green]✓[/]" if outcome.ok else "[red]✗[/]"
        err.print(f"{mark} {outcome.kind:14} {outcome.name:24} {escape(outcome.message)}")
    failed = sum(not o.ok for o in outcomes)
    err.print(f"{len(outcomes) - failed} removed, {failed} failed")


ACTION_STYLE = {
    "create": "green",
    "build": "green",
    "deploy": "green",
    "update": "yellow",
    "delete": "red",
    "failed": "bold red",
    "warn": "yellow",
    "unchanged": "dim",
    "keep": "dim",
    "gone": "dim",
}


def changes(rows: list[Change], *, title: str) -> None:
    """One change a line when it fits; else its detail on the next lines, wrapped at spaces. A name (an
    image, an account) is never broken by us: it stays whole in a log or a pipe and can be copied."""
    import textwrap

    from rich.text import Text

    err.print(title, highlight=False)
    widths = [max((len(getattr(row, column)) for row in rows), default=0) for column in ("action", "kind", "name")]
    fits = sum(widths) + 6 + max((len(row.detail) for row in rows), default=0) + 2 <= err.width
    for row in rows:
        line = Text("  ")
        line.append(row.action.ljust(widths[0]), style=ACTION_STYLE.get(row.action, ""))
        line.append(f"  {row.kind.ljust(widths[1])}  ")
        line.append(row.name.ljust(widths[2]) if fits and row.detail else row.name, style="bold")
        if fits and row.detail:
            line.append(f"  {row.detail}")
        err.print(line, soft_wrap=True, highlight=False)
        if row.detail and not fits:
            indent = " " * (widths[0] + 4)
            # At spaces only: a URI longer than the line overflows whole rather than being cut.
            width = max(err.width - len(indent), 20)
            for part in textwrap.wrap(row.detail, width, break_long_words=False, break_on_hyphens=False):
                err.print(Text(indent + part), soft_wrap=True, highlight=False)


def step(result: StepResult, label: str = "") -> None:
    """A step's changes on stderr; its result (image, endpoint, URL) alone on stdout."""
    title = "plan (--dry-run: nothing was called)" if result.dry_run else f"done in {duration(result.seconds)}"
    changes(result.changes, title=title)
    if result.result and not result.dry_run:
        if label:
            err.print(f"[green]✓[/] {label}: {result.result}")
        out.print(result.result)


def log_line(line: str) -> None:
    """A line of a build log, dimmed and verbatim."""
    from rich.text import Text

    err.print(Text(f"│ {line}", style="dim"), highlight=False)


def warning(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}")


CAVEAT = (
    "An estimate: on-demand list prices of the table's date, no discounts or taxes; "
    "Vertex AI bills each replica by the hour while it is deployed, whether it serves or not."
)


PARTS = {
    "gpu": "GPU",
    "vcpu": "vCPU",
    "ram": "RAM",
    "ui": "UI (Cloud Run)",
    "storage": "images (storage)",
    "total": "[bold]total[/]",
}


def replicas(low: int, high: int) -> str:
    """1 replica, 2 replicas, 1..3 replicas, 0..2 replicas (scale to zero)."""
    if low == high:
        return plural(low, "replica")
    return f"{low}..{high} replicas" + (" (scale to zero)" if low == 0 else "")


def usd_per_hour(value: float) -> str:
    """The one rounding of an hourly price in every output: cents hide the difference between machines."""
    return f"{value:,.4f}"


def estimate(result: Estimate, *, as_json: bool) -> None:
    if as_json:
        _json(result.as_dict())
        err.print(f"[dim]{CAVEAT}[/]")
        return
    low, high = result.low, result.high
    title = (
        f"{result.option.label} on {result.option.machine_type} ({result.option.count} GPU, "
        f"{result.option.vcpus} vCPU, {result.option.ram_gb:g} GB) in {result.region}, "
        f"{plural(result.days, 'day')}, {replicas(*result.replicas)}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("USD", justify="right")
    ranged = result.replicas[0] != result.replicas[1]
    if ranged:
        table.add_column(f"USD at {plural(result.replicas[1], 'replica')}", justify="right")
    for part, label in PARTS.items():
        values = [f"{getattr(low, part):,.2f}"] + ([f"{getattr(high, part):,.2f}"] if ranged else [])
        table.add_row(label, *values)
    out.print(table)
    hourly = result.machine_per_hour
    out.print(f"one replica: {usd_per_hour(hourly)} USD/hour = {hourly * 24:,.2f} USD/day")
    if result.speed is not None:
        out.print(speed_line(result.speed))
    for line in result.mode_lines():
        out.print(line, soft_wrap=True)
    if result.memory is not None:
        out.print(f"GPU memory: {result.memory.summary}", soft_wrap=True)
        if result.memory.warning:
            warning(result.memory.warning)
    err.print(f"[dim]{CAVEAT} Prices: {result.origin}, {result.table_date}.[/]")
    for note in result.unverified:
        err.print(f"[yellow]unverified:[/] {escape(note)}")
    for note in result.notes:
        err.print(escape(note))


def speed_line(row: Comparison) -> str:
    """One replica at full load; an image over the shared endpoint's limit is refused, so it has no throughput."""
    seconds = f"{'over ' if row.latency.lower_bound else ''}{row.latency.seconds:.1f} s/image"
    seconds += "" if row.latency.measured else " (estimated)"
    images, per_1000 = row.images_per_hour, row.usd_per_1000_images
    if images is None:
        return f"at full load: {seconds}, past a shared endpoint's 60 s limit: no throughput"
    money = "" if per_1000 is None else f", {per_1000:,.2f} USD per 1000 images"
    return f"at full load: {seconds}, {images:,.0f} images/hour{money}"
