"""Target cloudrun: upload (nothing to do) and deploy. STUB: helper cloudrun-deploy replaces it."""

from __future__ import annotations

from sdxlctl.config import Config
from sdxlctl.errors import DeployError
from sdxlctl.state import StateStore
from sdxlctl.steps import Outcome, Progress, StepResult, quiet


def upload(config: Config, store: StateStore, *, dry_run: bool) -> Outcome:
    raise DeployError("target cloudrun: upload is not built yet")


def plan_deploy(config: Config, store: StateStore) -> StepResult:
    raise DeployError("target cloudrun: deploy is not built yet")


def deploy(config: Config, store: StateStore, *, progress: Progress = quiet) -> StepResult:
    raise DeployError("target cloudrun: deploy is not built yet")
