"""What a deployment costs: the bundled price table (dated, sourced), and arithmetic on it. No cloud calls."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from sdxlctl.errors import UsageError
from sdxlctl.gpus import GPUS, GpuOption, gpu
from sdxlctl.pricing.memory import GpuMemory, gpu_memory
from sdxlctl.pricing.speed import (
    SHARED_LIMIT_S,
    TWO_PASS_SAMPLERS,
    Latency,
    Refining,
    latency,
    mode_lines,
    refining,
    seconds_per_image,
)

HOURS_PER_DAY = 24
DAYS_PER_MONTH = 30.44
WIDE_MARGIN = 2.0  # "fits with a wide margin": at most half of the shared endpoint's limit
UI_SECONDS_PER_REQUEST_OVERHEAD = 1.0  # page work besides waiting for the model


@dataclass(frozen=True)
class Rate:
    """One price, where it comes from, and whether a primary source confirms it."""

    usd: float
    source: str
    verified: bool


@dataclass(frozen=True)
class PriceTable:
    """The bundled (or live) unit prices per region."""

    date: str
    regions: dict[str, dict[str, Any]]
    cloud_run: dict[str, Any]
    artifact_registry: dict[str, Any]
    origin: str = "bundled"

    def rate(self, region: str, kind: str, key: str) -> Rate:
        """The price of one GPU card (kind gpu), vCPU or GB of RAM per hour; a clear error when missing."""
        entry = self.regions.get(region)
        if entry is None:
            raise UsageError(
                f"no prices for region {region!r} in the table of {self.date}",
                hint=f"regions priced: {', '.join(self.regions)}; or try --live",
            )
        row = entry.get(kind, {}).get(key)
        if row is None:
            raise UsageError(
                f"no {kind} price for {key!r} in {region} in the table of {self.date}",
                hint="try another region, or --live for the Cloud Billing catalog",
            )
        return Rate(float(row["usd"]), str(row["source"]), bool(row["verified"]))


@cache
def bundled() -> PriceTable:
    """The price table shipped with sdxlctl, with derived regions expanded."""
    data = json.loads((Path(__file__).parent / "prices.json").read_text())
    return from_data(data)


def from_data(data: dict[str, Any], origin: str = "bundled") -> PriceTable:
    regions: dict[str, dict[str, Any]] = {}
    for name, entry in data["regions"].items():
        if "derive" in entry:
            base, factor = data["regions"][entry["derive"]["from"]], entry["derive"]["factor"]
            entry = {
                "location": entry["location"],
                **{
                    kind: {
                        key: {"usd": row["usd"] * factor, "verified": False, "source": entry["source"]}
                        for key, row in base[kind].items()
                    }
                    for kind in ("gpu", "vcpu", "ram")
                },
            }
        regions[name] = entry
    return PriceTable(data["date"], regions, data["cloud_run"], data["artifact_registry"], origin)


def with_live(table: PriceTable, regions: dict[str, dict[str, Any]], date: str) -> PriceTable:
    """`table` with the catalog's prices laid over it, part by part (what the catalog lacks stays)."""
    merged = {
        name: {k: dict(v) if isinstance(v, dict) else v for k, v in entry.items()}
        for name, entry in table.regions.items()
    }
    for region, parts in regions.items():
        entry = merged.setdefault(region, {"location": region})
        for kind in ("gpu", "vcpu", "ram"):
            entry.setdefault(kind, {}).update(parts.get(kind, {}))
    return replace(table, regions=merged, date=date, origin="live (Cloud Billing catalog)")


# ---------------------------------------------------------------- cost


@dataclass(frozen=True)
class Breakdown:
    """USD for the whole period, by part."""

    gpu: float
    vcpu: float
    ram: float
    ui: float
    storage: float

    @property
    def endpoint(self) -> float:
        return self.gpu + self.vcpu + self.ram

    @property
    def total(self) -> float:
        return self.endpoint + self.ui + self.storage

    def as_dict(self) -> dict[str, float]:
        return {
            "gpu": round(self.gpu, 2),
            "vcpu": round(self.vcpu, 2),
            "ram": round(self.ram, 2),
            "endpoint": round(self.endpoint, 2),
            "ui": round(self.ui, 2),
            "storage": round(self.storage, 2),
            "total": round(self.total, 2),
        }


@dataclass(frozen=True)
class Estimate:
    """What a configuration costs over `days`, at its fewest and most replicas."""

    option: GpuOption
    region: str
    days: float
    replicas: tuple[int, int]
    low: Breakdown
    high: Breakdown
    machine_per_hour: float
    unverified: list[str] = field(default_factory=list)
    table_date: str = ""
    origin: str = "bundled"
    notes: list[str] = field(default_factory=list)
    speed: Comparison | None = None  # one replica at full load: s/image, images/hour, USD per 1000 images
    memory: GpuMemory | None = None  # the model server's GPU memory, against the GPU's
    refining: Refining | None = None  # s/image per `refine` mode, when [model] refiner is set
    two_pass: Latency | None = None  # s/image with a sampler that calls the UNet twice a step

    def mode_lines(self) -> list[str]:
        """Each `refine` mode's time and price per image, and the two-pass samplers' time (estimates)."""
        return mode_lines(self.refining, self.two_pass, self.machine_per_hour)

    def as_dict(self) -> dict[str, Any]:
        speed = self.speed.as_dict() if self.speed else {}
        extra: dict[str, Any] = {"gpu_memory": self.memory.as_dict()} if self.memory else {}
        if self.refining:
            extra["refiner"] = self.refining.as_dict(self.machine_per_hour)
        if self.two_pass:
            extra["two_pass_samplers"] = {
                "samplers": list(TWO_PASS_SAMPLERS),
                "seconds_per_image": round(self.two_pass.seconds, 2),
            }
        return {
            "estimate": True,
            "gpu": self.option.key,
            "machine": self.option.machine_type,
            "accelerator": f"{self.option.count} x {self.option.accelerator}",
            "region": self.region,
            "days": self.days,
            "replicas": {"min": self.replicas[0], "max": self.replicas[1]},
            "machine_usd_per_hour": round(self.machine_per_hour, 4),
            "usd": self.low.as_dict(),
            "usd_at_max_replicas": self.high.as_dict(),
            "unverified": self.unverified,
            "notes": self.notes,
            "prices": {"date": self.table_date, "origin": self.origin},
            **{key: speed.get(key) for key in SPEED_KEYS},
            **extra,
        }


SPEED_KEYS = ("seconds_per_image", "seconds_lower_bound", "images_per_hour", "usd_per_1000_images")


def machine_per_hour(table: PriceTable, option: GpuOption, region: str) -> tuple[float, list[Rate]]:
    """One replica per hour: the GPUs, the vCPUs and the RAM of the machine."""
    gpu_rate = table.rate(region, "gpu", option.key)
    vcpu_rate = table.rate(region, "vcpu", option.family)
    ram_rate = table.rate(region, "ram", option.family)
    total = gpu_rate.usd * option.count + vcpu_rate.usd * option.vcpus + ram_rate.usd * option.ram_gb
    return total, [gpu_rate, vcpu_rate, ram_rate]


def estimate(
    option: GpuOption,
    region: str,
    *,
    days: float,
    min_replicas: int,
    max_replicas: int,
    table: PriceTable | None = None,
    images_per_day: float = 0.0,
    ui: bool = True,
    baked: bool = False,
    steps: int = 30,
    level: str = "auto",
    refiner: bool = False,
    dtype: str = "auto",
) -> Estimate:
    """Cost of an endpoint (and its UI and images) for `days`; min_replicas 0 is scale to zero; `refiner`:
    the server loads one (its memory, and each `refine` mode's time per image)."""
    table = table or bundled()
    if days < 0:
        raise UsageError(f"--days {days:g}: must not be negative")
    if min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise UsageError(f"replicas {min_replicas}..{max_replicas}: need 0 <= min <= max and max >= 1")
    hourly, rates = machine_per_hour(table, option, region)
    hours = days * HOURS_PER_DAY
    gpu_rate, vcpu_rate, ram_rate = rates

    def breakdown(replicas: int) -> Breakdown:
        return Breakdown(
            gpu=gpu_rate.usd * option.count * replicas * hours,
            vcpu=vcpu_rate.usd * option.vcpus * replicas * hours,
            ram=ram_rate.usd * option.ram_gb * replicas * hours,
            ui=ui_cost(table, images_per_day * days, seconds_per_image(option.key)) if ui else 0.0,
            storage=storage_cost(table, days, baked=baked),
        )

    unverified = [
        f"{kind} {rate.source}" for kind, rate in zip(("GPU", "vCPU", "RAM"), rates, strict=True) if not rate.verified
    ]
    if not table.artifact_registry.get("verified", False):
        unverified.append(f"storage {table.artifact_registry['source']}")
    return Estimate(
        option,
        region,
        days,
        (min_replicas, max_replicas),
        breakdown(min_replicas),
        breakdown(max_replicas),
        hourly,
        unverified,
        table.date,
        table.origin,
        [baked_note(table)] if baked else [],
        Comparison(option, hourly, latency(option.key, steps, level)),
        gpu_memory(option, dtype=dtype, refiner=refiner),
        refining(option.key, steps, level) if refiner else None,
        latency(option.key, steps, level, unet_calls=2),
    )


def ui_cost(table: PriceTable, images: float, model_seconds: float) -> float:
    """Cloud Run, request-based, scale to zero: 1 vCPU and 1 GiB while a request waits on the model."""
    run = table.cloud_run
    seconds = images * (model_seconds + UI_SECONDS_PER_REQUEST_OVERHEAD)
    return (
        seconds * (run["usd_per_vcpu_second"] + run["usd_per_gib_second"])
        + images * run["usd_per_million_requests"] / 1e6
    )


def storage_cost(table: PriceTable, days: float, *, baked: bool = False) -> float:
    """The server and UI images in Artifact Registry (with the weights, when baked), above the free allowance."""
    registry = table.artifact_registry
    weights = registry.get("baked_weights_gb", 0.0) if baked else 0.0
    gigabytes = max(0.0, sum(registry["image_gb"].values()) + weights - registry["free_gb"])
    return gigabytes * registry["usd_per_gb_month"] * days / DAYS_PER_MONTH


def baked_note(table: PriceTable) -> str:
    """What [model] bake changes besides storage: sizes from the table, times not measured, so not given."""
    registry = table.artifact_registry
    size = registry.get("baked_weights_gb", 0.0)
    return (
        f"[model] bake: the server image is about {size:g} GB larger ({registry.get('baked_weights_source', '')}), "
        "in storage above and in every replica's image pull; each build downloads the weights once more "
        "(minutes, by the source's speed), and a replica starts without downloading them"
    )


# ---------------------------------------------------------------- latency and compare


@dataclass(frozen=True)
class Comparison:
    """One GPU option side by side with the others."""

    option: GpuOption
    usd_per_hour: float | None
    latency: Latency

    @property
    def images_per_hour(self) -> float | None:
        """None where an image does not fit a shared endpoint's limit: it is refused, so none come out."""
        return 3600 / self.latency.seconds if self.fits_shared else None

    @property
    def usd_per_1000_images(self) -> float | None:
        per_hour, images = self.usd_per_hour, self.images_per_hour
        return None if per_hour is None or images is None else per_hour / images * 1000

    @property
    def fits_shared(self) -> bool:
        return self.latency.seconds < SHARED_LIMIT_S and not (
            self.latency.lower_bound and self.latency.seconds >= SHARED_LIMIT_S
        )

    @property
    def fits_with_margin(self) -> bool:
        return not self.latency.lower_bound and self.latency.seconds * WIDE_MARGIN <= SHARED_LIMIT_S

    def as_dict(self) -> dict[str, Any]:
        per_hour = self.usd_per_hour
        return {
            "gpu": self.option.key,
            "machine": self.option.machine_type,
            "usd_per_hour": None if per_hour is None else round(per_hour, 4),
            "usd_per_day": None if per_hour is None else round(per_hour * 24, 2),
            "seconds_per_image": round(self.latency.seconds, 2),
            "seconds_lower_bound": self.latency.lower_bound,
            "seconds_measured": self.latency.measured,
            "images_per_hour": None if self.images_per_hour is None else round(self.images_per_hour, 1),
            "usd_per_1000_images": None if self.usd_per_1000_images is None else round(self.usd_per_1000_images, 3),
            "fits_60s_shared_endpoint": self.fits_shared,
            "fits_with_wide_margin": self.fits_with_margin,
        }


def compare(region: str, steps: int = 30, table: PriceTable | None = None, level: str = "auto") -> list[Comparison]:
    """Every GPU option in `region`: price, speed at SDXL_OPTIMIZE `level`, and whether it fits 60 s."""
    table = table or bundled()
    rows = []
    for option in GPUS.values():
        try:
            hourly: float | None = machine_per_hour(table, option, region)[0]
        except UsageError:
            hourly = None
        rows.append(Comparison(option, hourly, latency(option.key, steps, level)))
    return rows


def recommended_gpu(region: str, steps: int = 30, table: PriceTable | None = None) -> GpuOption:
    """The cheapest option that meets the 60 s limit with a wide margin (at least 2x)."""
    candidates = [c for c in compare(region, steps, table) if c.fits_with_margin and c.usd_per_hour is not None]
    if not candidates:
        raise UsageError(f"no GPU priced in {region} fits {SHARED_LIMIT_S:g} s at {steps} steps with a wide margin")
    return min(candidates, key=lambda c: c.usd_per_hour or 0.0).option


def machine_price(key: str, region: str) -> float | None:
    """One replica per hour, or None when the table has no price: for plans and status."""
    try:
        return machine_per_hour(bundled(), gpu(key), region)[0]
    except UsageError:
        return None
