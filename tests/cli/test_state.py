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
