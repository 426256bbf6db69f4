"""Reading a prompts file (.txt, .jsonl, .csv) into a checked Batch: every line against the server's rules,
every seed fixed, before anything is uploaded or started. STUB (issue 18, H1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdxlctl.batch import Batch

FORMATS = (".txt", ".jsonl", ".csv")


def read(path: Path, parameters: dict[str, Any], *, max_lines: int) -> Batch:
    """The batch of `path` with the shared `parameters`; a BatchInputError (a UsageError) naming the file, the
    line and the field of each bad line (the first 10, and how many more), before anything else happens."""
    raise NotImplementedError


def check_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """The shared parameters as the server reads them, checked (a UsageError naming the flag's field)."""
    raise NotImplementedError
