"""What a batch costs on Vertex AI batch prediction: images x seconds per image on the GPU, spread over the
replicas, plus each replica's start; billed per replica-hour at the online rate card (or Spot's)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sdxlctl.errors import UsageError
from sdxlctl.gpus import gpu as gpu_option
from sdxlctl.pricing.speed import SDXL_PIXELS, latency
from sdxlctl.pricing.table import PriceTable, bundled, machine_per_hour

# A batch replica's start, billed as a node hour ("the time a VM spends running your prediction job or
# waiting in a ready state"): 10 minutes. Not measured by this project (no run on Vertex AI batch prediction
# yet): a stated assumption, summed from its parts. A GPU VM with its drivers ~5 min (Vertex AI's own
# start: "each new replica minutes", README); pulling the ~8 GB server image (prices.json image_gb) and
# SDXL's ~7 GB of weights ~3 min; loading them and compiling the fast path 69 s with a warm compile cache
# (docs/benchmarks.md, run 4: cold start to health 200), ~1.5 min for the first compile. A replica that
# runs longer than its share pays this once; many replicas for a small batch pay it many times.
REPLICA_START_H = 10 / 60

# [model] time_limit_s and max_images at their defaults, for an estimate made without a config
DEFAULT_TIME_LIMIT_S = 55.0
DEFAULT_MAX_IMAGES = 4
MOST = 10**15  # images or replicas past this are a typo, not a batch (and past ~10**308 not a float)
TIME_LIMIT_ROOM = 0.8  # a request should finish within 80% of the server's time limit: queueing, decode, jitter

SPOT_MEANING = (
    "Spot: cheaper, may be preempted; Vertex AI restarts a preempted replica and the job retries its lines. "
    "A Spot job may take longer, or end FAILED when no capacity comes back (`--retry-failed` then runs the lines "
    "it did not finish)"
)


@dataclass(frozen=True)
class BatchEstimate:
    gpu: str  # key of gpus.GPUS
    region: str
    images: int
    seconds_per_image: float
    replicas: int  # the most the job may run
    spot: bool
    batch_size: int
    replica_hours: float
    wall_hours: float
    usd_per_replica_hour: float
    usd: float
    verified: bool  # False where a price used is marked unverified in prices.json
    notes: list[str] = field(default_factory=list)
    replica_start_h: float = REPLICA_START_H  # each replica's start, counted in replica_hours
    seconds_measured: bool = False  # seconds_per_image measured on this GPU, not estimated

    def as_dict(self) -> dict[str, Any]:
        return {
            "estimate": True,
            "gpu": self.gpu,
            "region": self.region,
            "images": self.images,
            "seconds_per_image": round(self.seconds_per_image, 3),
            "replicas": self.replicas,
            "spot": self.spot,
            "batch_size": self.batch_size,
            "replica_hours": round(self.replica_hours, 3),
            "wall_hours": round(self.wall_hours, 3),
            "usd_per_replica_hour": round(self.usd_per_replica_hour, 4),
            "usd": round(self.usd, 2),
            "verified": self.verified,
            "notes": list(self.notes),
            "replica_start_hours": round(self.replica_start_h, 4),
            "seconds_measured": self.seconds_measured,
        }


def batch_estimate(
    gpu: str,
    region: str,
    *,
    images: int,
    steps: int = 30,
    replicas: int = 1,
    spot: bool = False,
    level: str = "auto",
    num_images: int = 1,
    table: Any = None,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    max_images: int = DEFAULT_MAX_IMAGES,
    chosen_batch_size: int = 0,
    min_replicas: int = 0,
    pixels: int = SDXL_PIXELS,
) -> BatchEstimate:
    """`images` (lines x num_images) on up to `replicas` replicas of `gpu`: replica hours (the work plus each
    replica's start), hours until the last image, and USD at the on-demand or Spot rate card of `region`.

    The batch size shown is `chosen_batch_size` ([batch] batch_size) or, when 0, `batch_size(...)` for the
    server's time_limit_s and max_images; it changes the requests, not the work, so not the price.

    A start is charged only to the replicas that can have work, one request each at least (1 image on 50
    replicas starts 1), but to every one of `min_replicas` (the job's startingReplicaCount), which start anyway."""
    if images < 0:
        raise UsageError(f"--images {images}: must not be negative")
    if replicas < 1:
        raise UsageError(f"--replicas {replicas}: a batch needs at least 1 replica")
    for flag, count in (("--images", images), ("--replicas", replicas)):
        if count > MOST:
            shown = str(count) if count < 10**20 else f"{str(count)[:20]}..."
            raise UsageError(f"{flag} {shown}: too many to price (at most {MOST:.0e})")
    prices: PriceTable = table or bundled()
    option = gpu_option(gpu)
    speed = latency(option.key, steps, level, pixels=pixels)
    seconds = speed.seconds
    hourly, rates = machine_per_hour(prices, option, region, spot=spot)
    size = batch_size(
        option.key,
        steps=steps,
        num_images=num_images,
        time_limit_s=time_limit_s,
        max_images=max_images,
        level=level,
        pixels=pixels,
    )
    work_h = images * seconds / 3600
    shown_size = chosen_batch_size or size
    requests = math.ceil(images / (shown_size * max(1, num_images)))
    working = max(1, min(replicas, requests), min(min_replicas, replicas))
    replica_hours = work_h + working * REPLICA_START_H
    notes = [
        f"each replica's start (VM, image pull, model load) counted as {REPLICA_START_H * 60:g} min, an assumption"
    ]
    unverified: dict[str, list[str]] = {}  # one note per source: Spot's three parts share one
    for part, rate in zip(("GPU", "vCPU", "RAM"), rates, strict=True):
        if not rate.verified:
            unverified.setdefault(rate.source, []).append(part)
    notes += [f"unverified: {', '.join(parts)}: {source}" for source, parts in unverified.items()]
    if spot:
        notes.append(SPOT_MEANING)
    return BatchEstimate(
        gpu=option.key,
        region=region,
        images=images,
        seconds_per_image=seconds,
        replicas=replicas,
        spot=spot,
        batch_size=shown_size,
        replica_hours=replica_hours,
        wall_hours=work_h / working + REPLICA_START_H,
        usd_per_replica_hour=hourly,
        usd=replica_hours * hourly,
        verified=all(r.verified for r in rates),
        notes=notes,
        seconds_measured=speed.measured,
    )


def batch_size(
    gpu: str,
    *,
    steps: int,
    num_images: int,
    time_limit_s: float,
    max_images: int,
    level: str = "auto",
    pixels: int = SDXL_PIXELS,
) -> int:
    """Instances per request: as many as the server finishes within its time limit (with room) and max_images allows.

    The server generates a request's instances one after the other, each one pipeline call of num_images
    images, so a request takes about instances x num_images x seconds per image and must end within
    time_limit_s (SDXL_TIME_LIMIT, counted from its arrival), or every line of it fails. GPU memory bounds
    what one pipeline call holds, num_images, which [model] max_images caps for the GPU (the server refuses
    more than max_images images a request): so the memory enters as max_images // num_images, and the time
    limit decides the rest. Vertex AI's default of 64 instances would take minutes a request on any GPU here.
    """
    if num_images < 1:
        raise UsageError(f"num_images {num_images}: must be at least 1")
    per_instance = latency(gpu_option(gpu).key, steps, level, pixels=pixels).seconds * num_images
    in_time = math.floor(TIME_LIMIT_ROOM * time_limit_s / per_instance)
    return max(1, min(max_images // num_images, in_time))
