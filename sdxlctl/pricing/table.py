"""The bundled price table (dated, with sources), its rows, and the parts every target's estimate adds up."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from sdxlctl.errors import UsageError
from sdxlctl.gpus import GpuOption

HOURS_PER_DAY = 24
DAYS_PER_MONTH = 30.44
# A region's parts: on demand, and the same parts on Spot VMs (machine_per_hour(spot=True) reads spot_*).
KINDS = ("gpu", "vcpu", "ram", "spot_gpu", "spot_vcpu", "spot_ram")


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
    cloud_run_gpu: dict[str, Any] = field(default_factory=dict)  # target cloudrun's per-second rates

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
                    for kind in KINDS
                    if kind in base
                },
            }
        regions[name] = entry
    run_gpu = data.get("cloud_run_gpu", {})
    return PriceTable(data["date"], regions, data["cloud_run"], data["artifact_registry"], origin, run_gpu)


def with_live(table: PriceTable, regions: dict[str, dict[str, Any]], date: str) -> PriceTable:
    """`table` with the catalog's prices laid over it, part by part (what the catalog lacks stays)."""
    merged = {
        name: {k: dict(v) if isinstance(v, dict) else v for k, v in entry.items()}
        for name, entry in table.regions.items()
    }
    for region, parts in regions.items():
        entry = merged.setdefault(region, {"location": region})
        for kind in KINDS:
            entry.setdefault(kind, {}).update(parts.get(kind, {}))
    return replace(table, regions=merged, date=date, origin="live (Cloud Billing catalog)")


def machine_per_hour(
    table: PriceTable, option: GpuOption, region: str, *, spot: bool = False
) -> tuple[float, list[Rate]]:
    """One replica per hour: the GPUs, the vCPUs and the RAM of the machine, on demand or on Spot VMs."""
    kind = "spot_{}" if spot else "{}"
    gpu_rate = table.rate(region, kind.format("gpu"), option.key)
    vcpu_rate = table.rate(region, kind.format("vcpu"), option.family)
    ram_rate = table.rate(region, kind.format("ram"), option.family)
    total = gpu_rate.usd * option.count + vcpu_rate.usd * option.vcpus + ram_rate.usd * option.ram_gb
    return total, [gpu_rate, vcpu_rate, ram_rate]


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


def storage_cost(table: PriceTable, days: float, *, baked: bool = False) -> float:
    """The server and UI images in Artifact Registry (with the weights, when baked), above the free allowance."""
    registry = table.artifact_registry
    weights = registry.get("baked_weights_gb", 0.0) if baked else 0.0
    gigabytes = max(0.0, sum(registry["image_gb"].values()) + weights - registry["free_gb"])
    return gigabytes * registry["usd_per_gb_month"] * days / DAYS_PER_MONTH
