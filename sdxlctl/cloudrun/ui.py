"""Target cloudrun: ui-deploy. STUB: helper cloudrun-ui replaces it."""

from __future__ import annotations

from sdxlctl.config import Config
from sdxlctl.errors import DeployError
from sdxlctl.state import StateStore
from sdxlctl.steps import Progress, StepResult, quiet


def plan_ui(config: Config, store: StateStore, *, public: bool) -> StepResult:
    raise DeployError("target cloudrun: ui-deploy is not built yet")


def ui_deploy(
    config: Config, store: StateStore, *, public: bool, progress: Progress = quiet, on_log: Progress = quiet
) -> StepResult:
    raise DeployError("target cloudrun: ui-deploy is not built yet")
