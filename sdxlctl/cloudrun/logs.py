"""Target cloudrun: logs. STUB: helper cloudrun-inventory replaces it."""

from __future__ import annotations

from collections.abc import Iterator

from sdxlctl import steps
from sdxlctl.config import Config
from sdxlctl.errors import DeployError
from sdxlctl.state import StateStore
from sdxlctl.steps import Progress, quiet


def logs(
    config: Config, store: StateStore, request: steps.LogRequest, *, warn: Progress = quiet
) -> Iterator[steps.LogLine]:
    raise DeployError("target cloudrun: logs are not built yet")
