"""What a batch costs on Vertex AI batch prediction: images x seconds per image on the GPU, spread over the
replicas, plus each replica's start; billed per replica-hour at the online rate card (or Spot's).
STUB (issue 18, H6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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

    def as_dict(self) -> dict[str, Any]:
        raise NotImplementedError


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
) -> BatchEstimate:
    raise NotImplementedError


def batch_size(
    gpu: str, *, steps: int, num_images: int, time_limit_s: float, max_images: int, level: str = "auto"
) -> int:
    """Instances per request: as many as the server finishes within its time limit (with room) and max_images allows."""
    raise NotImplementedError
