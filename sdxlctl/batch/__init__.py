"""`sdxlctl batch`: what a batch is, as plain data shared by the input reader, the targets and the manifest.

A prompts file becomes a `Batch` (every line checked against the model server's own rules, every seed fixed);
the door (door.py) prices it and hands a `Submission` to the target (local/batch.py, vertex/batch.py), which
reports `Counts` while it runs and returns a `BatchResult`; the images and manifest.jsonl come from manifest.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

KEY_FIELD = "key"  # instanceConfig.keyField: the line number, removed from the instance, carried by its answer
MANIFEST = "manifest.jsonl"
IMAGES = "images"  # the folder of the images, beside the manifest
INPUT = "input.jsonl"  # the normalised input, beside the manifest (and uploaded for a Vertex AI job)


@dataclass(frozen=True)
class Line:
    """One prompt of the file: its line number there (1-based) and the server instance it became (seed set)."""

    number: int
    instance: dict[str, Any]  # prompt (or text), negative_prompt, prompt_2, negative_prompt_2, style, seed
    seed_drawn: bool = False  # the file gave no seed: one was drawn from the line (and is recorded)

    @property
    def key(self) -> str:
        return str(self.number)

    @property
    def prompt(self) -> str:
        return str(self.instance.get("prompt", self.instance.get("text", "")))

    @property
    def seed(self) -> int:
        return int(self.instance["seed"])


@dataclass(frozen=True)
class Batch:
    """A checked prompts file and the parameters every line shares (in the server's names)."""

    source: Path
    lines: tuple[Line, ...]
    parameters: dict[str, Any]  # num_inference_steps, guidance_scale, width, height, num_images, output_format, ...

    @property
    def images(self) -> int:
        """Images the batch makes: lines x num_images."""
        return len(self.lines) * int(self.parameters.get("num_images", 1))

    def request_line(self, line: Line) -> dict[str, Any]:
        """One line of the uploaded JSONL: the instance, its key, and the shared parameters in the instance too
        (whether Vertex AI passes modelParameters on to the container is unconfirmed: each line carries them)."""
        return {KEY_FIELD: line.key, **line.instance, "parameters": self.parameters}

    def jsonl(self) -> bytes:
        """The normalised input: one request line per prompt, in file order."""
        text = "".join(json.dumps(self.request_line(line), ensure_ascii=False) + "\n" for line in self.lines)
        return text.encode()

    def only(self, numbers: set[int]) -> Batch:
        """The same batch with only these lines (a resume, or --retry-failed)."""
        return replace(self, lines=tuple(line for line in self.lines if line.number in numbers))


@dataclass(frozen=True)
class BatchOptions:
    """What `sdxlctl batch` was asked; None: the [batch] config (then the server's defaults)."""

    source: Path | None  # the prompts file; None with attach
    parameters: dict[str, Any] = field(default_factory=dict)  # shared, server names, only what was given
    gpu: str | None = None
    replicas: tuple[int, int] | None = None  # --replicas MIN..MAX
    spot: bool | None = None
    out: str | None = None  # a folder (local) or a gs:// prefix (vertex)
    download: Path | None = None  # vertex: also write images and manifest here
    dry_run: bool = False
    attach: bool = False  # wait for the job this deployment started last (or `job`) instead of a new one
    job: str | None = None  # with attach: a job id or full name
    retry_failed: bool = False  # run only the lines the last run of this file failed
    yes: bool = False  # no confirmation above [batch] budget_usd


@dataclass(frozen=True)
class Submission:
    """What the target runs: the batch and the resources the door chose for it."""

    batch: Batch
    out: str  # the folder (local) or gs:// prefix ending in "/" (vertex) of the images and the manifest
    gpu: str = ""  # a key of gpus.GPUS (vertex)
    replicas: tuple[int, int] = (1, 1)
    spot: bool = False
    batch_size: int = 1  # instances per request to a replica
    download: Path | None = None
    usd_per_replica_hour: float = 0.0  # what "cost so far" multiplies replica hours by (0: local)
    retry_of: str = ""  # --retry-failed: the job (or folder) whose failed lines these are


@dataclass(frozen=True)
class Counts:
    """Where a running batch is: what the progress bar shows."""

    done: int  # lines answered with images
    failed: int  # lines answered with an error
    total: int  # lines in the batch
    state: str  # RUNNING, PENDING, ... (Vertex AI's JobState without the prefix), or "running" locally
    elapsed_s: float
    replica_hours: float | None = None
    usd_so_far: float | None = None
    skipped: int = 0  # lines already in the manifest (a resumed local batch)

    @property
    def left(self) -> int:
        return max(0, self.total - self.done - self.failed - self.skipped)

    @property
    def images_per_minute(self) -> float | None:
        return self.done * 60 / self.elapsed_s if self.elapsed_s > 0 and self.done else None


BatchProgress = Callable[[Counts], None]


def no_progress(_: Counts) -> None:
    """A progress callback that shows nothing."""


@dataclass(frozen=True)
class Row:
    """One line of manifest.jsonl: a line of the prompts file and what became of it."""

    line: int
    prompt: str
    seed: int
    parameters: dict[str, Any]
    images: list[str]  # paths relative to the manifest's folder (images/000137.png, images/000137-1.png)
    error: str | None = None  # the server's (or Vertex AI's) message when the line failed
    # The line as sent (key and parameters aside), so a resume sees an edited style or negative prompt; local rows.
    instance: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        row = {
            "line": self.line,
            "prompt": self.prompt,
            "seed": self.seed,
            "parameters": self.parameters,
            "images": self.images,
            "error": self.error,
        }
        return row if self.instance is None else {**row, "instance": self.instance}


@dataclass(frozen=True)
class BatchResult:
    """What a batch did, and where its images and manifest are."""

    where: str  # the Vertex AI job's name, or the local server's URL
    out: str  # the folder or gs:// prefix holding images/ and manifest.jsonl
    state: str  # SUCCEEDED, FAILED, CANCELLED, PARTIALLY_SUCCEEDED, ... ("SUCCEEDED" locally when it ran through)
    done: int
    failed: list[Row]  # the lines that failed, with the error
    skipped: int = 0  # lines already done before this run (resume)
    seconds: float = 0.0
    download: Path | None = None
    error: str = ""  # the job's own error (a FAILED or CANCELLED job)
    replica_hours: float | None = None
    usd: float | None = None
