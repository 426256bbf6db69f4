"""What target cloudrun costs: a Cloud Run service with one L4, billed per instance-second (idle included) and
rounded up to 100 ms, from the bundled table's `cloud_run_gpu` rows. Estimates, no cloud calls."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Any

from sdxlctl.errors import UsageError
from sdxlctl.gpus import CLOUD_RUN_GPU
from sdxlctl.pricing.speed import SDXL_PIXELS, Latency, latency
from sdxlctl.pricing.table import HOURS_PER_DAY, Breakdown, PriceTable, Rate, bundled, storage_cost

if TYPE_CHECKING:
    from sdxlctl.config import CloudRun, Config

DEFAULT_REGION = "us-central1"  # the region the table's rates are quoted for
MAX_REQUEST_S = 3600  # Cloud Run's longest request timeout (an image past it cannot come out)
# Times reach here as floats (sums of measured seconds): dust below a microsecond is arithmetic, not time,
# and must not tip a bill over to the next 100 ms.
_MICROSECOND = Decimal("0.000001")


def billed_seconds(seconds: float, increment_s: float = 0.1) -> float:
    """Instance-seconds as Cloud Run bills them: rounded UP to the next 100 ms (1.01 s -> 1.1 s, 1 s -> 1.0 s)."""
    if not math.isfinite(seconds) or seconds < 0:  # NaN or infinity would be a bill of NaN or a crash
        raise UsageError(f"{seconds:g} instance-seconds: must be a finite number and must not be negative")
    step = Decimal(repr(increment_s))
    exact = Decimal(repr(float(seconds))).quantize(_MICROSECOND, rounding=ROUND_HALF_EVEN)
    return float((exact / step).to_integral_value(rounding=ROUND_CEILING) * step)


@dataclass(frozen=True)
class CloudRunRates:
    """USD per second of one instance's parts in one region: the L4, a vCPU, a GiB of memory."""

    region: str
    gpu: Rate
    vcpu: Rate
    memory: Rate
    increment_s: float

    def per_second(self, cpu: float, memory_gib: float) -> float:
        return self.gpu.usd + self.vcpu.usd * cpu + self.memory.usd * memory_gib

    def unverified(self) -> list[str]:
        parts = (("GPU", self.gpu), ("vCPU", self.vcpu), ("memory", self.memory))
        return [f"Cloud Run {kind} {rate.source}" for kind, rate in parts if not rate.verified]


def cloud_run_rates(
    table: PriceTable | None = None, region: str = DEFAULT_REGION, *, zonal_redundancy: bool
) -> CloudRunRates:
    """The per-second rates of `region`; a clear error where Cloud Run has no L4 or the table no price."""
    table = table or bundled()
    problem = CLOUD_RUN_GPU.region_problem(region)
    if problem:
        raise UsageError(problem)
    prices = table.cloud_run_gpu
    entry = prices.get("regions", {}).get(region)
    if entry is None:
        priced = ", ".join(prices.get("regions", {}))
        raise UsageError(
            f"no Cloud Run GPU prices for {region} in the table of {table.date}",
            hint=f"regions priced: {priced} (Tier 1; the Tier 2 rates are not in the table)",
        )
    base = prices["regions"][entry["same_as"]] if "same_as" in entry else entry

    def rate(key: str) -> Rate:
        row = base[key]
        if "same_as" in entry:  # a region priced as another: an assumption, whatever the other's standing
            return Rate(float(row["usd"]), f"{entry['source']} ({row['source']})", False)
        return Rate(float(row["usd"]), str(row["source"]), bool(row["verified"]))

    gpu = rate("l4_zonal_redundancy" if zonal_redundancy else "l4")
    return CloudRunRates(region, gpu, rate("vcpu"), rate("memory"), float(prices.get("billing_increment_s", 0.1)))


def cloud_run_hourly(
    *,
    cpu: float,
    memory_gib: float,
    zonal_redundancy: bool,
    table: PriceTable | None = None,
    region: str = DEFAULT_REGION,
) -> float:
    """USD for one hour of one instance up (an L4, `cpu` vCPUs, `memory_gib`), serving or idle."""
    rates = cloud_run_rates(table, region, zonal_redundancy=zonal_redundancy)
    return rates.per_second(cpu, memory_gib) * 3600


def cloud_run_usd(
    seconds: float,
    *,
    cpu: float,
    memory_gib: float,
    zonal_redundancy: bool,
    table: PriceTable | None = None,
    region: str = DEFAULT_REGION,
) -> float:
    """USD for `seconds` of one instance's life, rounded up to 100 ms as Cloud Run bills them."""
    rates = cloud_run_rates(table, region, zonal_redundancy=zonal_redundancy)
    return billed_seconds(seconds, rates.increment_s) * rates.per_second(cpu, memory_gib)


def busy_hours(hours: float) -> float:
    """--busy-hours-per-day, checked: the hours a day an instance serves (0 < h <= 24)."""
    if not 0 < hours <= HOURS_PER_DAY:
        raise UsageError(
            f"--busy-hours-per-day {hours:g}: must be more than 0 and at most 24",
            hint="the hours a day an instance is up serving requests, e.g. 2 for bursts, 24 for round the clock",
        )
    return float(hours)


@dataclass(frozen=True)
class CloudRunComparison:
    """Cloud Run's L4 beside the Vertex AI rows of `cost --compare`: per hour up, idle, per 1000 images."""

    region: str
    cpu: int
    memory_gib: int
    min_instances: int
    zonal_redundancy: bool
    timeout_s: int
    latency: Latency
    rates: CloudRunRates | None  # None where Cloud Run has no L4 or the table no price: `problem` says which
    problem: str | None = None
    busy_hours_per_day: float = HOURS_PER_DAY

    def at(self, hours: float) -> CloudRunComparison:
        """The same row at another duty cycle (hours a day an instance serves)."""
        return replace(self, busy_hours_per_day=busy_hours(hours))

    @property
    def usd_per_hour(self) -> float | None:
        return None if self.rates is None else self.rates.per_second(self.cpu, self.memory_gib) * 3600

    @property
    def instance_hours_per_day(self) -> float:
        """min instances around the clock; with none, one instance up for the busy hours (scale to zero)."""
        return self.min_instances * HOURS_PER_DAY if self.min_instances else self.busy_hours_per_day

    @property
    def idle_usd_per_day(self) -> float | None:
        """What a day with no request costs: min instances are billed in full while idle; 0 at min 0."""
        hourly = self.usd_per_hour
        return None if hourly is None else self.min_instances * HOURS_PER_DAY * hourly

    @property
    def usd_per_day(self) -> float | None:
        hourly = self.usd_per_hour
        return None if hourly is None else self.instance_hours_per_day * hourly

    @property
    def fits_timeout(self) -> bool:
        return self.latency.seconds < min(self.timeout_s, MAX_REQUEST_S)

    @property
    def images_per_hour(self) -> float | None:
        """One instance at full load; None where an image takes longer than the request timeout."""
        return 3600 / self.latency.seconds if self.fits_timeout else None

    @property
    def images_per_day(self) -> float | None:
        per_hour = self.images_per_hour
        return None if per_hour is None else per_hour * self.busy_hours_per_day

    @property
    def usd_per_1000_images(self) -> float | None:
        """A day's bill over a day's images at the duty cycle: idle min instances raise it, scale to zero not."""
        per_day, images = self.usd_per_day, self.images_per_day
        return None if per_day is None or not images else per_day / images * 1000

    def as_dict(self) -> dict[str, Any]:
        def money(value: float | None, places: int) -> float | None:
            return None if value is None else round(value, places)

        return {
            "target": "cloudrun",
            "gpu": CLOUD_RUN_GPU.key,
            "accelerator": CLOUD_RUN_GPU.accelerator,
            "region": self.region,
            "cpu": self.cpu,
            "memory_gib": self.memory_gib,
            "zonal_redundancy": self.zonal_redundancy,
            "min_instances": self.min_instances,
            "usd_per_hour_while_up": money(self.usd_per_hour, 4),
            "idle_usd_per_day": money(self.idle_usd_per_day, 2),
            "busy_hours_per_day": self.busy_hours_per_day,
            "usd_per_day": money(self.usd_per_day, 2),
            "seconds_per_image": round(self.latency.seconds, 2),
            "seconds_measured": self.latency.measured,
            "images_per_hour": money(self.images_per_hour, 1),
            "usd_per_1000_images": money(self.usd_per_1000_images, 3),
            "request_timeout_s": self.timeout_s,
            "fits_request_timeout": self.fits_timeout,
            "billing": "per instance-second while up (idle included), rounded up to 100 ms",
            "unverified": self.rates.unverified() if self.rates else [],
            "problem": self.problem,
        }


def cloud_run_row(
    run: CloudRun,
    region: str,
    steps: int = 30,
    table: PriceTable | None = None,
    level: str = "auto",
    pixels: int = SDXL_PIXELS,
) -> CloudRunComparison:
    """[cloudrun]'s instance in `region` as a compare row; unpriced (with the reason) rather than refused."""
    try:
        rates: CloudRunRates | None = cloud_run_rates(table, region, zonal_redundancy=run.zonal_redundancy)
        problem = None
    except UsageError as exc:
        rates, problem = None, exc.message
    return CloudRunComparison(
        region,
        run.cpu,
        run.memory_gib,
        run.min_instances,
        run.zonal_redundancy,
        run.timeout_s,
        latency(CLOUD_RUN_GPU.key, steps, level, pixels=pixels),
        rates,
        problem,
    )


@dataclass(frozen=True)
class CloudRunEstimate:
    """What target cloudrun costs over `days`: min instances around the clock, one instance for the busy hours
    on top when it scales to zero; and at most (max instances around the clock)."""

    row: CloudRunComparison  # the instance's shape, rates, speed and duty cycle
    rates: CloudRunRates
    days: float
    max_instances: int
    storage: float
    unverified: list[str] = field(default_factory=list)
    table_date: str = ""
    origin: str = "bundled"
    notes: list[str] = field(default_factory=list)

    def at(self, hours: float) -> CloudRunEstimate:
        """The same estimate with instances serving `hours` a day."""
        return replace(self, row=self.row.at(hours))

    @property
    def region(self) -> str:
        return self.row.region

    @property
    def busy_hours_per_day(self) -> float:
        return self.row.busy_hours_per_day

    @property
    def replicas(self) -> tuple[int, int]:
        """(min, max) instances, named as Vertex AI's estimate names its replicas."""
        return self.row.min_instances, self.max_instances

    @property
    def machine_per_hour(self) -> float:
        """One instance up for an hour."""
        return self.rates.per_second(self.row.cpu, self.row.memory_gib) * 3600

    @property
    def idle_usd_per_day(self) -> float:
        return self.row.min_instances * HOURS_PER_DAY * self.machine_per_hour

    def _breakdown(self, instance_hours: float) -> Breakdown:
        seconds = instance_hours * 3600
        return Breakdown(
            gpu=self.rates.gpu.usd * seconds,
            vcpu=self.rates.vcpu.usd * self.row.cpu * seconds,
            ram=self.rates.memory.usd * self.row.memory_gib * seconds,
            ui=0.0,  # request-based and priced per image: nothing while nobody uses it
            storage=self.storage,
        )

    @property
    def low(self) -> Breakdown:
        """At the duty cycle: min instances around the clock (idle included), or the busy hours at min 0."""
        return self._breakdown(self.row.instance_hours_per_day * self.days)

    @property
    def high(self) -> Breakdown:
        """At most: max instances up around the clock."""
        return self._breakdown(self.max_instances * HOURS_PER_DAY * self.days)

    def as_dict(self) -> dict[str, Any]:
        row = self.row.as_dict()
        return {
            "estimate": True,
            "target": "cloudrun",
            **{key: row[key] for key in ("gpu", "accelerator", "region", "cpu", "memory_gib", "zonal_redundancy")},
            "days": self.days,
            "instances": {"min": self.row.min_instances, "max": self.max_instances},
            "busy_hours_per_day": self.busy_hours_per_day,
            "instance_hours": round(self.row.instance_hours_per_day * self.days, 2),
            "instance_usd_per_hour": round(self.machine_per_hour, 4),
            "idle_usd_per_day": round(self.idle_usd_per_day, 2),
            "usd": _usd(self.low),
            "usd_at_max_instances": _usd(self.high),
            **{key: row[key] for key in ("seconds_per_image", "seconds_measured", "images_per_hour")},
            "images_per_day": None if self.row.images_per_day is None else round(self.row.images_per_day),
            "usd_per_1000_images": row["usd_per_1000_images"],
            "billing": {"per": "instance-second, idle included", "rounded_up_to_s": self.rates.increment_s},
            "unverified": self.unverified,
            "notes": self.notes,
            "prices": {"date": self.table_date, "origin": self.origin},
        }


def _usd(breakdown: Breakdown) -> dict[str, float]:
    """The parts in USD; the instances' total is the service's ("endpoint", Vertex AI's word, kept for scripts)."""
    usd = breakdown.as_dict()
    return {key: value for part, value in usd.items() for key in (["service", part] if part == "endpoint" else [part])}


def cloud_run_estimate(
    config: Config,
    table: PriceTable | None = None,
    *,
    days: float,
    gpu_key: str | None = None,
    region: str | None = None,
    steps: int = 30,
    busy_hours_per_day: float = HOURS_PER_DAY,
    pixels: int = SDXL_PIXELS,
) -> CloudRunEstimate:
    """`sdxlctl cost` on target cloudrun: [cloudrun]'s instance in the region over `days`, as an estimate."""
    table = table or bundled()
    if days < 0:
        raise UsageError(f"--days {days:g}: must not be negative")
    problem = CLOUD_RUN_GPU.gpu_problem(gpu_key or config.deploy.gpu)
    if problem:
        raise UsageError(problem, hint="price it with target vertex: SDXLCTL_TARGET=vertex sdxlctl cost --gpu ...")
    run = config.cloudrun
    row = cloud_run_row(run, region or config.gcp.region, steps, table, config.model.optimize, pixels)
    rates = cloud_run_rates(table, row.region, zonal_redundancy=run.zonal_redundancy)  # its error, if unpriced
    unverified = rates.unverified()
    if not table.artifact_registry.get("verified", False):
        unverified.append(f"storage {table.artifact_registry['source']}")
    notes = [
        "Cloud Run bills an instance from its start until it is shut down, idle included; after the last "
        "request an instance stays up (and billed) until Cloud Run stops it: count that time in the busy hours",
        "the free tier (vCPU- and GiB-seconds a month per billing account) is not subtracted; the GPU has none",
    ]
    return CloudRunEstimate(
        row.at(busy_hours_per_day),
        rates,
        days,
        run.max_instances,
        storage_cost(table, days, baked=config.model.bake),
        unverified,
        table.date,
        table.origin,
        notes,
    )
