"""Target cloudrun: status and teardown. STUB: helper cloudrun-inventory replaces it."""

from __future__ import annotations

from datetime import datetime

from sdxlctl.config import Config
from sdxlctl.errors import DeployError
from sdxlctl.state import Resource, State, StateStore
from sdxlctl.steps import Progress, Removal, StepResult, TornDown, quiet


def unrecorded(config: Config, store: StateStore, state: State) -> dict[str, Resource]:
    return {}


def live_states(config: Config, resources: dict[str, Resource]) -> dict[str, str]:
    return {}


def cost_so_far(config: Config, resource: Resource, now: datetime) -> float | None:
    return None


def teardown_plan(
    config: Config, store: StateStore, *, images: bool, dry_run: bool, progress: Progress = quiet
) -> Removal | StepResult:
    raise DeployError("target cloudrun: teardown is not built yet")


def teardown(
    config: Config, store: StateStore, removal: Removal, *, progress: Progress = quiet
) -> StepResult | TornDown:
    raise DeployError("target cloudrun: teardown is not built yet")
