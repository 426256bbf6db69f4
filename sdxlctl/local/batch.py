"""`sdxlctl batch` on target local: the lines through the running local server, resumable. STUB (issue 18, H4)."""

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
    """Send the lines not yet in the manifest, `batch_size` at a time; write images and rows as they come."""
    raise NotImplementedError


def previous_rows(config: Config, store: StateStore, out: Path) -> dict[int, Row]:
    """The manifest rows already in `out` (for resume and --retry-failed)."""
    raise NotImplementedError
