"""Target vertex: the model server on a Vertex AI endpoint, the UI on Cloud Run; the interface core dispatches to.

One module per lifecycle step: names (names, labels, the server's environment), images (build), serve
(upload, deploy, predict), ui (ui-deploy), inventory (status, teardown); access holds the accounts and
grants they share. Every step is idempotent: it looks at what exists (state file first, then labels in
the cloud) and changes only what differs. A dry run answers from the config and the state alone.
"""

from __future__ import annotations

from typing import Any

from sdxlctl.config import Config
from sdxlctl.state import Resource, State, StateStore
from sdxlctl.steps import Progress, Removal, StepResult, quiet
from sdxlctl.vertex import inventory, serve, ui
from sdxlctl.vertex.checks import check
from sdxlctl.vertex.images import build as build_image
from sdxlctl.vertex.images import build_local, plan_build
from sdxlctl.vertex.inventory import cost_so_far, live_states
from sdxlctl.vertex.logs import logs
from sdxlctl.vertex.names import LABEL

__all__ = [
    "build",
    "build_local",
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
    """The model server's image, by Cloud Build, unless one of the same context exists."""
    if dry_run:
        return plan_build(config, store)
    return build_image(config, store, progress=progress, on_log=on_log)


def upload(config: Config, store: StateStore, *, dry_run: bool, progress: Progress = quiet) -> StepResult:
    """The image as a Vertex AI Model; a new version when the container spec changed."""
    if dry_run:
        return serve.plan_upload(config, store)
    return serve.upload(config, store, progress=progress)


def deploy(config: Config, store: StateStore, *, dry_run: bool, progress: Progress = quiet) -> StepResult:
    """The uploaded model on the endpoint's GPU."""
    if dry_run:
        return serve.plan_deploy(config, store)
    return serve.deploy(config, store, progress=progress)


def ui_deploy(
    config: Config,
    store: StateStore,
    *,
    public: bool,
    dry_run: bool,
    progress: Progress = quiet,
    on_log: Progress = quiet,
) -> StepResult:
    """The UI on Cloud Run, as an account that may only call the endpoint."""
    if dry_run:
        return ui.plan_ui(config, store, public=public)
    return ui.ui_deploy(config, store, public=public, progress=progress, on_log=on_log)


def predict(
    config: Config, store: StateStore, body: dict[str, Any], *, timeout_s: float, progress: Progress = quiet
) -> tuple[dict[str, Any], str]:
    """The request through the endpoint's predict; the checked answer and the deployment's name."""
    return serve.predict(config, store, body, timeout_s=timeout_s)


def unrecorded(config: Config, store: StateStore, state: State) -> dict[str, Resource]:
    """What carries this deployment's label but the state file does not hold (as teardown finds it)."""
    return inventory.unrecorded(config, store, state)


def teardown_plan(
    config: Config, store: StateStore, *, images: bool, dry_run: bool, progress: Progress = quiet
) -> Removal | StepResult:
    """Everything of this deployment, found by label and from the state; a dry run only from the state."""
    if dry_run:
        return inventory.plan_teardown(config, store, images=images)
    progress(f"finding resources labelled {LABEL}={config.name}")
    found = inventory.inventory(config, store, images=images)
    return Removal("vertex", changes=found.changes(), found=found)


def teardown(config: Config, store: StateStore, removal: Removal, *, progress: Progress = quiet) -> StepResult:
    """Delete what the plan found, past failures; with nothing found, forget records of what is gone."""
    return inventory.teardown(config, store, removal.found, progress=progress)
