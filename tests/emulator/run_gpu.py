"""Cloud Run v2: what Google checks of a service's GPU fields. STUB: helper emulator-identity replaces it."""

from __future__ import annotations

from typing import Any

from tests.emulator.core import World


def validate_gpu(service: dict[str, Any], location: str, world: World) -> None:
    """Raise ApiError as Google refuses a GPU service (camelCase JSON of a run_v2.Service)."""
