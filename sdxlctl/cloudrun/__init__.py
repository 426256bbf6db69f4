"""Target cloudrun: the model server as a Cloud Run service on an NVIDIA L4 that scales to zero, the UI beside it.

One module per lifecycle step, as target vertex (what Cloud Run allows a GPU is gpus.CLOUD_RUN_GPU): spec (the
service as Cloud Run's v2 message), deploy (deploy; upload has nothing to do: Cloud Run runs the image),
predict (the service URL with an ID token, through a cold start), ui (ui-deploy), inventory (status,
teardown), logs, checks. The image is target vertex's: the same build, the same Artifact Registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sdxlctl import steps
from sdxlctl.cloudrun import deploy as serving
from sdxlctl.cloudrun import inventory, ui
from sdxlctl.cloudrun import logs as logs_of
from sdxlctl.cloudrun import predict as predicting
from sdxlctl.cloudrun.checks import check
from sdxlctl.config import Config
from sdxlctl.state import Resource, State, StateStore
from sdxlctl.steps import Outcome, Progress, Removal, StepResult, TornDown, quiet
from sdxlctl.vertex.images import build as build_image
from sdxlctl.vertex.images import plan_build

__all__ = [
    "build",
    "check",
    "cost_so_far",
    "deploy",
    "live_states",
    "logs",
    "predict",
    "teardown",
    "teardown_plan",
    "ui_deploy",
    "unrecorded",
    "upload",
]


def build(
    config: Config, store: StateStore, *, dry_run: bool, progress: Progress = quiet, on_log: Progress = quiet
) -> StepResult:
    """The model server's image, by Cloud Build (the same image target vertex runs)."""
    if dry_run:
        return plan_build(config, store)
    return build_image(config, store, progress=progress, on_log=on_log)


def upload(config: Config, store: StateStore, *, dry_run: bool, progress: Progress = quiet) -> Outcome:
    """Nothing to register: Cloud Run runs the built image itself."""
    return serving.upload(config, store, dry_run=dry_run)


def deploy(config: Config, store: StateStore, *, dry_run: bool, progress: Progress = quiet) -> StepResult:
    """The image as a Cloud Run service on an L4: created, updated where it differs, or left alone."""
    if dry_run:
        return serving.plan_deploy(config, store)
    return serving.deploy(config, store, progress=progress)


def ui_deploy(
    config: Config,
    store: StateStore,
    *,
    public: bool,
    dry_run: bool,
    progress: Progress = quiet,
    on_log: Progress = quiet,
) -> StepResult:
    """The UI on Cloud Run, as an account that may only invoke the model's service."""
    if dry_run:
        return ui.plan_ui(config, store, public=public)
    return ui.ui_deploy(config, store, public=public, progress=progress, on_log=on_log)


def predict(
    config: Config, store: StateStore, body: dict[str, Any], *, timeout_s: float, progress: Progress = quiet
) -> tuple[dict[str, Any], str]:
    """The request to the service's URL with an ID token, waiting through a cold start; the answer and the URL."""
    return predicting.predict(config, store, body, timeout_s=timeout_s, progress=progress)


def unrecorded(config: Config, store: StateStore, state: State) -> dict[str, Resource]:
    return inventory.unrecorded(config, store, state)


def live_states(config: Config, resources: dict[str, Resource]) -> dict[str, str]:
    return inventory.live_states(config, resources)


def cost_so_far(config: Config, resource: Resource, now: datetime) -> float | None:
    return inventory.cost_so_far(config, resource, now)


def teardown_plan(
    config: Config, store: StateStore, *, images: bool, dry_run: bool, progress: Progress = quiet
) -> Removal | StepResult:
    return inventory.teardown_plan(config, store, images=images, dry_run=dry_run, progress=progress)


def teardown(
    config: Config, store: StateStore, removal: Removal, *, progress: Progress = quiet
) -> StepResult | TornDown:
    return inventory.teardown(config, store, removal, progress=progress)


def logs(
    config: Config, store: StateStore, request: steps.LogRequest, *, warn: Progress = quiet
) -> Iterator[steps.LogLine]:
    return logs_of.logs(config, store, request, warn=warn)
