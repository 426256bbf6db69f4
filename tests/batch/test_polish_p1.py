"""Polish of issue 18 (P1): what the door plans for -n against [model] max_images, what --retry-failed says
of a file that never ran, the local estimate, counts said as people say them, the killed-server hint, the
seed's words in JSONL and CSV. Real files, a real config and state folder; nothing here reaches a server."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdxlctl.batch import Batch, BatchOptions, Line, Row, Submission, manifest
from sdxlctl.batch.door import plan
from sdxlctl.batch.lines import BatchInputError, read
from sdxlctl.config import Config
from sdxlctl.errors import PredictError, UsageError
from sdxlctl.local import batch as local_batch
from sdxlctl.state import Resource, StateStore


def config(target: str = "vertex", **sections: dict[str, Any]) -> Config:
    return Config.model_validate({"target": target, "gcp": {"project": "demo-project"}, **sections})


def prompts(tmp_path: Path, count: int = 3) -> Path:
    path = tmp_path / "fox.txt"
    path.write_text("".join(f"a red fox, number {n}\n" for n in range(1, count + 1)))
    return path


@pytest.mark.parametrize("target", ["vertex", "local"])
def test_auto_batch_size_never_plans_more_images_a_request_than_max_images(target: str, tmp_path: Path) -> None:
    source = prompts(tmp_path)
    for n in (1, 2, 3, 4):
        chosen = plan(config(target), StateStore(tmp_path), BatchOptions(source, parameters={"num_images": n}))
        assert chosen.submission.batch_size * n <= 4, (n, chosen.submission.batch_size)


@pytest.mark.parametrize("target", ["vertex", "local"])
def test_an_explicit_batch_size_too_large_for_num_images_is_refused_naming_all_three(
    target: str, tmp_path: Path
) -> None:
    # [batch] batch_size 4, -n 2, [model] max_images 4: 8 images a request, refused by the server for every
    # line after the job had started billing
    chosen = config(target, batch={"batch_size": 4}, model={"max_images": 4})
    with pytest.raises(UsageError) as refused:
        plan(chosen, StateStore(tmp_path), BatchOptions(prompts(tmp_path), parameters={"num_images": 2}))
    said = str(refused.value)
    assert "[batch] batch_size 4" in said and "-n 2" in said and "[model] max_images 4" in said, said


def test_num_images_above_max_images_is_refused_by_the_door_naming_both(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as refused:
        plan(config(), StateStore(tmp_path), BatchOptions(prompts(tmp_path), parameters={"num_images": 5}))
    said = str(refused.value)
    assert "-n 5" in said and "[model] max_images 4" in said, said


@pytest.mark.parametrize("target", ["vertex", "local"])
def test_retry_failed_of_a_file_that_never_ran_says_so(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as refused:
        plan(config(target), StateStore(tmp_path), BatchOptions(prompts(tmp_path), retry_failed=True))
    said, hint = str(refused.value), refused.value.hint or ""
    assert "no run of fox.txt" in said and "job )" not in said, said
    assert "without --retry-failed" in hint, hint


def test_a_local_estimate_starts_no_replica(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    chosen = plan(config("local"), StateStore(tmp_path), BatchOptions(prompts(tmp_path), dry_run=True))
    assert chosen.estimate.replica_start_h == 0
    assert chosen.estimate.as_dict().get("replica_start_hours", 0) == 0


def test_one_failed_line_is_said_in_the_singular(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = Line(number=1, instance={"prompt": "a red fox", "seed": 7}, seed_drawn=False)
    batch = Batch(source=prompts(tmp_path, 1), lines=(line,), parameters={})
    out = tmp_path / "batch-fox"
    manifest.append(out / "manifest.jsonl", [Row(1, "a red fox", 7, {}, [], "too bright", local_batch.sent(line))])
    said: list[str] = []
    submission = Submission(batch, str(out), "", (1, 1), False, 1, None, 0.0, "")
    local_batch.run(config("local"), StateStore(tmp_path), submission, say=said.append)
    assert any("1 line failed before" in s for s in said), said
    assert not any("1 lines" in s for s in said), said


def test_the_retry_plan_says_one_failed_line_in_the_singular(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = prompts(tmp_path, 2)
    rows = [Row(1, "a red fox, number 1", 1, {}, [], "x"), Row(2, "a red fox, number 2", 2, {}, ["i"], None)]
    manifest.append(tmp_path / "batch-fox" / "manifest.jsonl", rows)
    chosen = plan(config("local"), StateStore(tmp_path), BatchOptions(source, retry_failed=True))
    assert any("only the 1 failed line of" in note for note in chosen.notes), chosen.notes


@contextlib.contextmanager
def hangs_up() -> Iterator[str]:
    """A loopback server that reads a request and closes the connection without an answer (a killed server)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # so the loop sees stop: a close does not wake a blocked accept on Linux
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_a_killed_server_hint_says_try_again_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the client's hint ended "then try again"; the batch's own resume hint says how to try again
    monkeypatch.chdir(tmp_path)
    store = StateStore(tmp_path)
    line = Line(number=1, instance={"prompt": "a red fox", "seed": 7}, seed_drawn=False)
    submission = Submission(Batch(prompts(tmp_path, 1), (line,), {}), "out", "", (1, 1), False, 1, None, 0.0, "")
    with hangs_up() as url:
        store.record("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", url=url, details={}))
        with pytest.raises(PredictError) as stopped:
            local_batch.run(config("local"), store, submission)
    hint = stopped.value.hint or ""
    assert "try again" not in hint and hint.count("then") == 1, hint
    assert "`sdxlctl status` shows it" in hint and local_batch.RESUME_HINT in hint, hint


def test_a_bad_seed_reads_the_same_in_jsonl_and_csv(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "seed": -1}\n{"prompt": "a", "seed": "x"}\n')
    (tmp_path / "p.csv").write_text("prompt,seed\na,-1\na,x\n")
    said: dict[str, list[str]] = {}
    for name in ("p.jsonl", "p.csv"):
        with pytest.raises(BatchInputError) as refused:
            read(tmp_path / name, {}, max_lines=10)
        said[name] = [line.split(": ", 1)[1] for line in str(refused.value).splitlines() if " line " in line]
    assert said["p.jsonl"] == said["p.csv"], said
    assert all("0 to 4294967295" in s for s in said["p.csv"]), said
