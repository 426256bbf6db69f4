"""The images and manifest.jsonl of a batch: from the server's answers (local) or a Vertex AI job's output
lines (vertex); read back for resume and --retry-failed. STUB (issue 18, H2)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdxlctl.batch import Batch, Row


def rows_from_answer(
    batch: Batch, numbers: list[int], answer: dict[str, Any], *, images_dir: str
) -> tuple[list[Row], list[tuple[str, bytes]]]:
    """The manifest rows of the lines `numbers` from one server answer {"predictions": [...]} (in order), and the
    image files to write as (relative path, bytes)."""
    raise NotImplementedError


def rows_from_output(batch: Batch, lines: Iterable[str]) -> tuple[list[Row], list[tuple[str, bytes]]]:
    """The rows and image files from a Vertex AI job's output JSONL lines (results and errors files alike):
    {"key": "137", "prediction": {...}} or {"key": ..., "error": {"code"|"status", "message"}}; `instance`
    instead of `key` is matched by its position. Lines of the batch with no output line are failed rows."""
    raise NotImplementedError


def read(path: Path) -> dict[int, Row]:
    """The manifest at `path`, the last row of each line winning (a rerun appends); {} when there is none.
    A damaged line is skipped with nothing lost (its line runs again)."""
    raise NotImplementedError


def append(path: Path, rows: Iterable[Row]) -> None:
    """Append rows to the manifest (created with its folder), each line flushed whole."""
    raise NotImplementedError
