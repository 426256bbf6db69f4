"""What a step did, as data: the result types every target returns and the CLI renders (a leaf module)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sdxlctl.state import Resource

Progress = Callable[[str], None]  # told each phase of a long step, for a spinner


def plural(count: float, word: str) -> str:
    """1 day, 2 days, 0.5 days: a count as people write it (words whose plural adds an s)."""
    return f"{count:g} {word}" + ("" if count == 1 else "s")


def quiet(_: str) -> None:
    """A progress callback that shows nothing."""


@dataclass(frozen=True)
class Change:
    """One line of a plan or a report: what happens (or happened) to which resource."""

    action: str  # create, update, delete, unchanged, build, deploy, keep, gone
    kind: str
    name: str
    detail: str = ""


@dataclass(frozen=True)
class StepResult:
    """What a step did, and the address it leaves behind (image, endpoint, URL)."""

    changes: list[Change]
    result: str = ""
    seconds: float = 0.0
    dry_run: bool = False
    failed: int = 0


@dataclass(frozen=True)
class Notice:
    """A step with nothing to do on this target, or the plan of one that is told in a sentence."""

    message: str


@dataclass(frozen=True)
class DeployResult:
    """What a deploy on this machine did and where the process answers."""

    action: Literal["started", "restarted", "unchanged", "resumed"]
    resource: Resource
    seconds: float
    what: str = "model server"


@dataclass(frozen=True)
class TeardownOutcome:
    """What happened to one resource."""

    kind: str
    name: str
    ok: bool
    message: str


@dataclass(frozen=True)
class Removal:
    """What teardown will remove: shown and confirmed, then handed back to the target that found it."""

    target: str
    resources: list[Resource] = field(default_factory=list)  # processes to stop and forget
    changes: list[Change] = field(default_factory=list)  # cloud resources to delete
    found: Any = None  # the target's own inventory of them

    @property
    def empty(self) -> bool:
        return not self.resources and not self.changes


@dataclass(frozen=True)
class TornDown:
    """What teardown did to each resource."""

    outcomes: list[TeardownOutcome]

    @property
    def failed(self) -> int:
        return sum(not outcome.ok for outcome in self.outcomes)


Outcome = StepResult | Notice | DeployResult | TornDown


@dataclass(frozen=True)
class PredictResult:
    """The files written and what made them."""

    paths: list[Path]
    seeds: list[int]
    width: int
    height: int
    output_format: str
    seconds: float
    url: str
    notes: list[str] = field(default_factory=list)  # what was changed in the input images to send them


@dataclass(frozen=True)
class LogRequest:
    """What `sdxlctl logs` asks for: the UI's log or the server's, the last `lines`, since when, followed."""

    ui: bool = False
    lines: int | None = None
    since: datetime | None = None
    follow: bool = False


@dataclass(frozen=True)
class LogLine:
    """One line of a deployment's log; `time` where it is known, `severity` for a cloud entry."""

    text: str
    time: datetime | None = None
    severity: str = ""  # set for Cloud Logging entries, shown before the text with the time


@dataclass(frozen=True)
class ResourceStatus:
    """One row of `sdxlctl status`."""

    kind: str
    name: str
    target: str
    url: str
    created_at: datetime
    uptime_s: float | None  # None: gone, so how long it was up is not known here
    state: str
    details: dict[str, Any] = field(default_factory=dict)
    cost_so_far: float | None = None  # USD since creation, for resources billed by the hour
    recorded: bool = True  # False: found running (by label, by process marker), not in this folder's state file


@dataclass(frozen=True)
class Check:
    """One line of `sdxlctl check`: what was checked, whether it holds, and the fix when it does not."""

    name: str  # "credentials", "api run.googleapis.com", "gpu quota", "port 8080"
    status: Literal["ok", "fail", "warn"]  # warn: could not tell, or holds with a caveat; only fail fails
    detail: str
    fix: str = ""
