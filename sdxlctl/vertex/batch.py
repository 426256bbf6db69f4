"""`sdxlctl batch` on target vertex: a BatchPredictionJob on the uploaded Model. STUB (issue 18, H3)."""

from __future__ import annotations

from pathlib import Path

from sdxlctl.batch import BatchProgress, BatchResult, Row, Submission, no_progress
from sdxlctl.config import Config
from sdxlctl.state import StateStore
from sdxlctl.steps import Progress, quiet


def run(
    config: Config,
    store: StateStore,
    submission: Submission,
    *,
    progress: BatchProgress = no_progress,
    say: Progress = quiet,
) -> BatchResult:
    """Upload the input, create the job (recorded before the wait), wait with progress, collect the output."""
    raise NotImplementedError


def attach(
    config: Config,
    store: StateStore,
    job: str | None,
    *,
    download: Path | None = None,
    progress: BatchProgress = no_progress,
    say: Progress = quiet,
) -> BatchResult:
    """Wait for a job already started (the last one of this deployment, or `job`) and collect its output."""
    raise NotImplementedError


def previous_rows(config: Config, store: StateStore, source: Path) -> tuple[str, dict[int, Row]]:
    """The last job of this deployment run on `source` and its manifest rows (for --retry-failed)."""
    raise NotImplementedError
