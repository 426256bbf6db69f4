"""Target cloudrun: predict. STUB: helper cloudrun-predict replaces it."""

from __future__ import annotations

from typing import Any

from sdxlctl.config import Config
from sdxlctl.errors import DeployError
from sdxlctl.state import StateStore
from sdxlctl.steps import Progress, quiet


def predict(
    config: Config, store: StateStore, body: dict[str, Any], *, timeout_s: float, progress: Progress = quiet
) -> tuple[dict[str, Any], str]:
    raise DeployError("target cloudrun: predict is not built yet")
