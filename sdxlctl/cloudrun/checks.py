"""Target cloudrun: `sdxlctl check`. STUB: helper cloudrun-checks replaces it."""

from __future__ import annotations

from sdxlctl.config import Config
from sdxlctl.state import StateStore
from sdxlctl.steps import Check


def check(config: Config, store: StateStore) -> list[Check]:
    return []
