"""The door of `sdxlctl batch`: read and check the prompts file, price it, confirm, hand it to the target.
STUB (issue 18, H7)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sdxlctl.batch import Batch, BatchOptions, BatchProgress, BatchResult, Submission, no_progress
from sdxlctl.config import Config
from sdxlctl.pricing.batch import BatchEstimate
from sdxlctl.state import StateStore
from sdxlctl.steps import Progress, quiet


@dataclass(frozen=True)
class BatchPlan:
    """What a batch will do and cost: shown by --dry-run, and before a confirmation."""

    submission: Submission
    estimate: BatchEstimate
    target: str
    notes: list[str]  # e.g. what Spot means, where the output goes


def plan(config: Config, store: StateStore, options: BatchOptions) -> BatchPlan:
    """The checked batch, where it runs and what it costs; nothing is uploaded or started."""
    raise NotImplementedError


def run(
    config: Config,
    store: StateStore,
    options: BatchOptions,
    *,
    progress: BatchProgress = no_progress,
    say: Progress = quiet,
    confirm: Callable[[BatchPlan], bool] = lambda _: False,
) -> BatchPlan | BatchResult:
    """Run (or with dry_run, plan; with attach, wait for) a batch on the configured target."""
    raise NotImplementedError


def cost(
    config: Config, *, images: int, gpu: str | None, replicas: int | None, spot: bool | None, steps: int
) -> BatchEstimate:
    """`sdxlctl cost --images N`: the same arithmetic as a batch's --dry-run."""
    raise NotImplementedError


__all__ = ["Batch", "BatchPlan", "cost", "plan", "run"]
