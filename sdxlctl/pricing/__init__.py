"""Prices (a dated data file with sources) and the cost arithmetic on them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MachinePrice:
    """What one replica of a GPU option costs per hour in a region, and where the figure comes from."""

    gpu: str
    region: str
    usd_per_hour: float
    source: str
    verified: bool

    @property
    def usd_per_day(self) -> float:
        return self.usd_per_hour * 24


@cache
def table() -> dict[str, Any]:
    """The bundled price table."""
    return json.loads((Path(__file__).parent / "machines.json").read_text())


def machine_price(gpu: str, region: str) -> MachinePrice | None:
    """The price of one replica, or None when the table has no figure for that GPU in that region."""
    for row in table()["machines"]:
        if row["gpu"] == gpu and row["region"] == region:
            return MachinePrice(row["gpu"], row["region"], row["usd_per_hour"], row["source"], row["verified"])
    return None
