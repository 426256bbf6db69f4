"""What a deployment costs: the bundled price table (dated, sourced), and arithmetic on it. No cloud calls."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sdxlctl.errors import UsageError
from sdxlctl.gpus import GPUS, GpuOption, gpu
from sdxlctl.pricing.batch import BatchEstimate as BatchEstimate
from sdxlctl.pricing.batch import batch_estimate as batch_estimate
from sdxlctl.pricing.batch import batch_size as batch_size
from sdxlctl.pricing.cloudrun import CloudRunComparison as CloudRunComparison
from sdxlctl.pricing.cloudrun import CloudRunEstimate as CloudRunEstimate
from sdxlctl.pricing.cloudrun import billed_seconds as billed_seconds
from sdxlctl.pricing.cloudrun import busy_hours as busy_hours
from sdxlctl.pricing.cloudrun import cloud_run_estimate as cloud_run_estimate
from sdxlctl.pricing.cloudrun import cloud_run_hourly as cloud_run_hourly
from sdxlctl.pricing.cloudrun import cloud_run_row
from sdxlctl.pricing.cloudrun import cloud_run_usd as cloud_run_usd
from sdxlctl.pricing.memory import GpuMemory, gpu_memory
from sdxlctl.pricing.speed import (
    SDXL_PIXELS,
    SHARED_LIMIT_S,
    TWO_PASS_SAMPLERS,
    Latency,
    Refining,
    latency,
    mode_lines,
    refining,
    seconds_per_image,
)
from sdxlctl.pricing.table import DAYS_PER_MONTH as DAYS_PER_MONTH
from sdxlctl.pricing.table import HOURS_PER_DAY, Breakdown, PriceTable, bundled, storage_cost
from sdxlctl.pricing.table import Rate as Rate
from sdxlctl.pricing.table import from_data as from_data
from sdxlctl.pricing.table import machine_per_hour as machine_per_hour
from sdxlctl.pricing.table import with_live as with_live

if TYPE_CHECKING:
    from sdxlctl.config import CloudRun

SPOT_ONLINE = "cheaper, may be preempted; Vertex AI restarts a preempted replica"  # what Spot means online
ONLINE_SPOT = f"priced at Spot rates ([deploy] spot = true): Spot VMs: {SPOT_ONLINE}"
WIDE_MARGIN = 2.0  # "fits with a wide margin": at most half of the shared endpoint's limit
UI_SECONDS_PER_REQUEST_OVERHEAD = 1.0  # page work besides waiting for the model


# ---------------------------------------------------------------- cost


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
    spot: bool = False  # [deploy] spot: priced at Spot rates

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
            "spot": self.spot,
            "usd": self.low.as_dict(),
            "usd_at_max_replicas": self.high.as_dict(),
            "unverified": self.unverified,
            "notes": self.notes,
            "prices": {"date": self.table_date, "origin": self.origin},
            **{key: speed.get(key) for key in SPEED_KEYS},
            **extra,
        }


SPEED_KEYS = ("seconds_per_image", "seconds_lower_bound", "images_per_hour", "usd_per_1000_images")


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
    spot: bool = False,
    pixels: int = SDXL_PIXELS,
) -> Estimate:
    """Cost of an endpoint (and its UI and images) for `days`; min_replicas 0 is scale to zero; `refiner`:
    the server loads one (its memory, and each `refine` mode's time per image); `spot`: [deploy] spot, the
    replicas on Spot VMs at Spot rates."""
    table = table or bundled()
    if days < 0:
        raise UsageError(f"--days {days:g}: must not be negative")
    if min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise UsageError(f"replicas {min_replicas}..{max_replicas}: need 0 <= min <= max and max >= 1")
    hourly, rates = machine_per_hour(table, option, region, spot=spot)
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
        ([baked_note(table)] if baked else []) + ([ONLINE_SPOT] if spot else []),
        Comparison(option, hourly, latency(option.key, steps, level, pixels=pixels)),
        gpu_memory(option, dtype=dtype, refiner=refiner),
        refining(option.key, steps, level, pixels=pixels) if refiner else None,
        latency(option.key, steps, level, unet_calls=2, pixels=pixels),
        spot,
    )


def ui_cost(table: PriceTable, images: float, model_seconds: float) -> float:
    """Cloud Run, request-based, scale to zero: 1 vCPU and 1 GiB while a request waits on the model."""
    run = table.cloud_run
    seconds = images * (model_seconds + UI_SECONDS_PER_REQUEST_OVERHEAD)
    return (
        seconds * (run["usd_per_vcpu_second"] + run["usd_per_gib_second"])
        + images * run["usd_per_million_requests"] / 1e6
    )


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


def compare(
    region: str, steps: int = 30, table: PriceTable | None = None, level: str = "auto", pixels: int = SDXL_PIXELS
) -> list[Comparison]:
    """Every GPU option in `region`: price, speed at SDXL_OPTIMIZE `level`, and whether it fits 60 s."""
    table = table or bundled()
    rows = []
    for option in GPUS.values():
        try:
            hourly: float | None = machine_per_hour(table, option, region)[0]
        except UsageError:
            hourly = None
        rows.append(Comparison(option, hourly, latency(option.key, steps, level, pixels=pixels)))
    return rows


def recommended_gpu(region: str, steps: int = 30, table: PriceTable | None = None) -> GpuOption:
    """The cheapest option that meets the 60 s limit with a wide margin (at least 2x)."""
    candidates = [c for c in compare(region, steps, table) if c.fits_with_margin and c.usd_per_hour is not None]
    if not candidates:
        raise UsageError(f"no GPU priced in {region} fits {SHARED_LIMIT_S:g} s at {steps} steps with a wide margin")
    return min(candidates, key=lambda c: c.usd_per_hour or 0.0).option


def machine_price(key: str, region: str, *, spot: bool = False) -> float | None:
    """One replica per hour (on Spot VMs with `spot`), or None when the table has no price: for plans and status."""
    try:
        return machine_per_hour(bundled(), gpu(key), region, spot=spot)[0]
    except UsageError:
        return None


@dataclass(frozen=True)
class Compared:
    """`cost --compare`: every Vertex AI GPU option, and Cloud Run's L4 with [cloudrun]'s shape."""

    gpus: list[Comparison]
    cloud_run: CloudRunComparison

    def at(self, hours: float) -> Compared:
        """Cloud Run's row at a duty cycle of `hours` a day (Vertex AI bills its replicas around the clock)."""
        return replace(self, cloud_run=self.cloud_run.at(hours))


def compare_all(
    run: CloudRun,
    region: str,
    steps: int = 30,
    table: PriceTable | None = None,
    level: str = "auto",
    pixels: int = SDXL_PIXELS,
) -> Compared:
    """The compare table: Vertex AI's options and Cloud Run's L4 in `region`, images of `pixels`."""
    table = table or bundled()
    return Compared(
        compare(region, steps, table, level, pixels), cloud_run_row(run, region, steps, table, level, pixels)
    )
