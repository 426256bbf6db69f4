"""What sdxlctl created, in .sdxlctl/state.json: written atomically, under a lock."""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the block is done (main thread only; elsewhere a no-op).

    Around "start something, then record it": a Ctrl-C between the two would leave it running unknown.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class StateError(SdxlctlError):
    """The state folder or file cannot be read or written: an ordinary OS error, with what to do."""


def _os_error(exc: OSError, home: Path, doing: str) -> StateError:
    """One line naming the path and the cause, and a hint that fits the cause."""
    where = exc.filename or home
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return StateError(
            f"cannot {doing}: {where} is a file, not a folder",
            hint=f"sdxlctl keeps its state in the folder {home} (beside sdxlctl.toml): move the file aside",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StateError(
            f"cannot {doing}: {where}: {exc.strerror}",
            hint=f"make {home} writable, or run sdxlctl beside an sdxlctl.toml in a folder you may write",
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StateError(
            f"cannot {doing}: {where}: {exc.strerror}",
            hint="free some disk space and run the command again; the previous state file is intact",
        )
    return StateError(f"cannot {doing}: {where}: {exc.strerror or exc}", hint="fix the cause and run the command again")


class StateStore:
    """The state file of one folder. Read freely; change only inside `transaction()`.

    Beside it, run/ holds one record per local process (the same Resource), so that a process stays
    findable, and stoppable, when state.json is damaged or lost.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / "state.json"
        self.run = home / "run"

    def read(self) -> State:
        """The current state (empty when nothing was created yet)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise _os_error(exc, self.home, "read the state file") from None
        try:
            return State.model_validate_json(data)
        except ValidationError as exc:
            aside = self.path.with_name("state.json.damaged")
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise StateError(
                f"{self.path} is not a state file sdxlctl can read ({where + ': ' if where else ''}{first['msg']})",
                hint=f"move it aside (mv {self.path} {aside}): `sdxlctl teardown` still finds local processes by "
                f"their records in {self.run} and cloud resources by label",
            ) from None

    def _prepare(self) -> None:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, self.home, "create the state folder") from None

    @contextmanager
    def transaction(self) -> Iterator[State]:
        """Read, let the caller change, write back atomically: all under one lock held across processes."""
        from filelock import FileLock, Timeout

        self._prepare()
        lock = FileLock(str(self.home / "state.lock"), timeout=60)
        try:
            lock.acquire()
        except Timeout:
            raise StateError(
                f"another sdxlctl has been changing {self.home} for 60 s",
                hint="wait for it to finish; if none runs, delete state.lock there",
            ) from None
        except OSError as exc:
            raise _os_error(exc, self.home, "lock the state file") from None
        try:
            state = self.read()
            yield state
            self.write(state)
        finally:
            lock.release()

    def record(self, deployment: str, resource: Resource) -> None:
        """Record `resource`; the same one recorded again keeps its creation time and adds to its details."""
        with self.transaction() as state:
            previous = state.get(deployment, resource.kind)
            if previous is not None and previous.name == resource.name:
                resource = resource.model_copy(
                    update={"created_at": previous.created_at, "details": {**previous.details, **resource.details}}
                )
            state.put(deployment, resource)

    def update_details(self, deployment: str, kind: str, **details: Any) -> None:
        """Set details of a recorded resource; None removes one. Nothing when it is not recorded."""
        with self.transaction() as state:
            resource = state.get(deployment, kind)
            if resource is not None:
                for key, value in details.items():
                    if value is None:
                        resource.details.pop(key, None)
                    else:
                        resource.details[key] = value

    def forget(self, deployment: str, kind: str) -> None:
        """Drop the record of one resource."""
        with self.transaction() as state:
            state.remove(deployment, kind)

    def write(self, state: State) -> None:
        """Write `state` now; only inside `transaction()`, which holds the lock (and writes again at its end)."""
        self._write(self.path, json.dumps(state.model_dump(mode="json"), indent=2) + "\n", "write the state file")

    def _write(self, path: Path, text: str, doing: str) -> None:
        # Write a sibling file, fsync, rename: a reader sees the old file or the new one, never half of one.
        try:
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
        except OSError as exc:
            raise _os_error(exc, self.home, doing) from None
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException as exc:
            Path(temporary).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise _os_error(exc, self.home, doing) from None
            raise

    # ------------------------------------------------------------ per-process records

    def _record_path(self, deployment: str, kind: str) -> Path:
        return self.run / f"{deployment}.{kind}.json"

    def record_process(self, deployment: str, resource: Resource) -> None:
        """Keep a copy of a local process's record in run/, apart from state.json."""
        try:
            self.run.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(exc, self.home, "create the process records' folder") from None
        path = self._record_path(deployment, resource.kind)
        self._write(path, resource.model_dump_json(indent=2) + "\n", "write a process record")

    def process_records(self, deployment: str) -> dict[str, Resource]:
        """The run/ records of one deployment, by kind; unreadable ones are skipped (they name no process)."""
        records = {}
        for path in sorted(self.run.glob(f"{deployment}.*.json")):
            try:
                resource = Resource.model_validate_json(path.read_bytes())
            except (OSError, ValidationError):
                continue
            if path.name == f"{deployment}.{resource.kind}.json":
                records[resource.kind] = resource
        return records

    def forget_process(self, deployment: str, kind: str) -> None:
        """Drop a process's run/ record (it was stopped, or it is not ours)."""
        # Left behind it names a process that owns() no longer recognises: harmless, dropped next time.
        with suppress(OSError):
            self._record_path(deployment, kind).unlink(missing_ok=True)
