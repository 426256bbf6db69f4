"""The state file: atomic, locked, readable after many processes wrote it at once."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from sdxlctl.errors import SdxlctlError
from sdxlctl.state import Resource, StateStore


def _add_many(home: str, worker: int) -> None:
    store = StateStore(Path(home))
    for i in range(25):
        with store.transaction() as state:
            state.put(f"w{worker}", Resource(kind=f"r{i}", name=f"w{worker}-r{i}", target="local"))


def test_concurrent_writers_lose_nothing_and_never_corrupt(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_many, args=(str(tmp_path), w)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    state = StateStore(tmp_path).read()
    assert len(state.resources) == 4 * 25
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".state-")]  # no temporary files left


def test_an_exception_inside_a_transaction_writes_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with store.transaction() as state:
        state.put("d", Resource(kind="a", name="a", target="local"))
    with pytest.raises(RuntimeError), store.transaction() as state:
        state.put("d", Resource(kind="b", name="b", target="local"))
        raise RuntimeError
    assert list(store.read().of("d")) == ["a"]


def test_a_damaged_state_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"resources": {"x": {"kind": 1}}}))
    with pytest.raises(SdxlctlError, match="state file"):
        StateStore(tmp_path).read()


def _grow_under_a_size_limit(home: str, limit: int) -> None:
    """In a child: writes past `limit` bytes fail (EFBIG), as on a full disk; then try to write a bigger state."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    store = StateStore(Path(home))
    try:
        with store.transaction() as state:
            for i in range(50):
                state.put("d", Resource(kind=f"r{i}", name=f"resource-{i}", target="local", details={"i": i}))
    except SdxlctlError as exc:
        raise SystemExit(3 if "File too large" in exc.message else 4) from None
    raise SystemExit(0)


def test_a_write_that_fails_midway_leaves_the_old_state_whole(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with store.transaction() as state:
        state.put("d", Resource(kind="a", name="a", target="local"))
    before = store.path.read_bytes()
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_grow_under_a_size_limit, args=(str(tmp_path), len(before) + 64))
    child.start()
    child.join(60)
    assert child.exitcode == 3  # the write failed, and said why in one message
    assert store.path.read_bytes() == before  # written in place, it would be cut off at the limit
    assert list(store.read().of("d")) == ["a"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".state-")]


def test_a_failing_fsync_leaves_the_old_state_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    store = StateStore(tmp_path)
    with store.transaction() as state:
        state.put("d", Resource(kind="a", name="a", target="local"))
    before = store.path.read_bytes()

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(SdxlctlError, match="Input/output error"), store.transaction() as state:
        state.put("d", Resource(kind="b", name="b", target="local"))
    assert store.path.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"{", "not a state file"),
        (b"\xff\xfe\x00\x01", "not a state file"),
        (b"[]", "not a state file"),
        (b'{"resources": {"x": {"kind": 1}}}', r"not a state file .*resources\.x\.kind: Input should be"),
    ],
)
def test_any_damaged_state_file_is_a_clear_error(tmp_path: Path, content: bytes, says: str) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(SdxlctlError, match=says) as raised:
        StateStore(tmp_path).read()
    assert "move it aside" in (raised.value.hint or "")


def test_a_state_file_that_is_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()
    with pytest.raises(SdxlctlError, match="state file"):
        StateStore(tmp_path).read()
