"""What sdxlctl created, in .sdxlctl/state.json: written atomically, under a lock."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from sdxlctl.errors import SdxlctlError

STATE_VERSION = 1


class Resource(BaseModel):
    """One thing sdxlctl created: a local process, an endpoint, a model, a service."""

    kind: str  # e.g. "local-server", "local-ui", "vertex-endpoint"
    name: str
    target: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    url: str = ""
    details: dict[str, Any] = Field(default_factory=dict)

    def age_seconds(self, now: datetime | None = None) -> float:
        """Seconds since it was created."""
        return ((now or datetime.now(UTC)) - self.created_at).total_seconds()


class State(BaseModel):
    """Every resource of every deployment this folder made, keyed '<deployment>/<kind>'."""

    version: int = STATE_VERSION
    resources: dict[str, Resource] = Field(default_factory=dict)

    def of(self, deployment: str) -> dict[str, Resource]:
        """The resources of one deployment, by kind."""
        prefix = f"{deployment}/"
        return {key.removeprefix(prefix): r for key, r in self.resources.items() if key.startswith(prefix)}

    def get(self, deployment: str, kind: str) -> Resource | None:
        return self.resources.get(f"{deployment}/{kind}")

    def put(self, deployment: str, resource: Resource) -> None:
        self.resources[f"{deployment}/{resource.kind}"] = resource

    def remove(self, deployment: str, kind: str) -> None:
        self.resources.pop(f"{deployment}/{kind}", None)


class StateStore:
    """The state file of one folder. Read freely; change only inside `transaction()`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / "state.json"

    def read(self) -> State:
        """The current state (empty when nothing was created yet)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return State()
        try:
            return State.model_validate_json(text)
        except ValidationError as exc:
            raise SdxlctlError(
                f"{self.path} is not a state file sdxlctl can read ({exc.error_count()} problems)",
                hint="move it aside; `sdxlctl teardown` still finds cloud resources by label",
            ) from None

    @contextmanager
    def transaction(self) -> Iterator[State]:
        """Read, let the caller change, write back atomically: all under one lock held across processes."""
        from filelock import FileLock

        self.home.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.home / "state.lock"), timeout=60):
            state = self.read()
            yield state
            self.write(state)

    def write(self, state: State) -> None:
        """Write `state` now; only inside `transaction()`, which holds the lock (and writes again at its end)."""
        # Write a sibling file, fsync, rename: a reader sees the old file or the new one, never half of one.
        handle, temporary = tempfile.mkstemp(dir=self.home, prefix=".state-", suffix=".json")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(json.dumps(state.model_dump(mode="json"), indent=2) + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
