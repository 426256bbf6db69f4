"""Batch prediction jobs in teardown and status: a running job is found by its label (no state file needed) and
cancelled, a finished job's record is deleted, the output in gs:// stays; a failed job reports its error and
the lines that failed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sdxlctl.batch import Counts
from sdxlctl.errors import Interrupted
from sdxlctl.vertex import batch as vertex_batch
from tests.batch.test_vertex_run import gs_objects, make_batch, out, submission, uploaded
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator


def sent(emulator: Emulator, method: str, suffix: str) -> int:
    return sum(1 for r in emulator.requests() if r["method"] == method and r["path"].endswith(suffix))


def test_teardown_cancels_a_running_job_found_by_its_label_with_the_state_file_gone(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    emulator.slow("batchPredictionJobs")

    def progress(counts: Counts) -> None:
        if counts.state == "RUNNING":
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        vertex_batch.run(config, store, submission(make_batch(2)), progress=progress)
    (job,) = emulator.batch_jobs()
    status = json.loads(cli("status", "--json", env=emulator.env()).out)
    (row,) = [r for r in status["resources"] if r["kind"].startswith("batch-")]
    assert row["name"] == job["name"] and "RUNNING 0/2" in json.dumps(row), row

    (tmp_path / ".sdxlctl" / "state.json").unlink()
    lost = json.loads(cli("status", "--json", env=emulator.env()).out)
    (row,) = [r for r in lost["resources"] if r["name"] == job["name"]]  # found by its label
    assert row["kind"].startswith("batch-") and "RUNNING 0/" in json.dumps(row), row
    plan = cli("teardown", "--dry-run", env=emulator.env())
    assert plan.code == 0, plan.err
    down = cli("teardown", "--yes", env=emulator.env())
    assert down.code == 0, down.err
    assert sent(emulator, "POST", ":cancel") == 1
    assert job["name"] in down.out + down.err
    assert emulator.batch_jobs() == []  # cancelled, then its record deleted once it stopped
    assert emulator.labelled() == []
    assert "input.jsonl" in gs_objects(emulator, out())  # the user's files stay


def test_teardown_deletes_a_finished_jobs_record_and_keeps_its_output(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    result = vertex_batch.run(config, store, submission(make_batch(2)))
    assert result.state == "SUCCEEDED"
    status = json.loads(cli("status", "--json", env=emulator.env()).out)
    assert "SUCCEEDED 2/2" in json.dumps([r for r in status["resources"] if r["kind"].startswith("batch-")])
    before = gs_objects(emulator, out())

    plan = cli("teardown", "--dry-run", env=emulator.env())
    assert plan.code == 0 and result.where in plan.out + plan.err, plan.err
    assert out() in plan.out + plan.err  # kept, and said so
    down = cli("teardown", "--yes", env=emulator.env())
    assert down.code == 0, down.err
    assert sent(emulator, "POST", ":cancel") == 0 and sent(emulator, "DELETE", result.where.rsplit("/", 1)[-1]) == 1
    assert emulator.batch_jobs() == []
    assert gs_objects(emulator, out()) == before  # images, manifest, raw output: all still there
    assert {"images/000001.png", "images/000002.png", "manifest.jsonl"} <= set(before)


def test_a_failed_job_reports_its_error_and_the_lines_that_failed(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    # a width above the server's 2048: every request is refused (400), so every line fails and so does the job
    refused = {"num_inference_steps": 2, "width": 4096, "height": 64, "output_format": "png"}
    result = vertex_batch.run(config, store, submission(make_batch(3, refused)))
    assert result.state == "FAILED"
    assert "width" in result.error, result.error
    assert [row.line for row in result.failed] == [1, 2, 3] and result.done == 0
    assert all("width" in str(row.error) for row in result.failed), result.failed
    rows = [json.loads(line) for line in gs_objects(emulator, out())["manifest.jsonl"].decode().splitlines()]
    assert [(r["line"], r["images"], "width" in r["error"]) for r in rows] == [(i, [], True) for i in (1, 2, 3)]

    # --retry-failed: the failed lines of the last job on this file, rerun into the same folder and manifest
    where, previous = vertex_batch.previous_rows(config, store, Path("prompts.txt"))
    assert where == result.where and sorted(n for n, row in previous.items() if row.error) == [1, 2, 3]
    retry = submission(make_batch(3).only({2, 3}), retry_of=where)
    again = vertex_batch.run(config, store, retry)
    assert (again.state, again.done, again.out) == ("SUCCEEDED", 2, out())
    objects = gs_objects(emulator, out())
    rows = [json.loads(line) for line in objects["manifest.jsonl"].decode().splitlines()]
    assert [(r["line"], r["images"], r["error"] is None) for r in rows] == [
        (1, [], False),
        (2, ["images/000002.png"], True),
        (3, ["images/000003.png"], True),
    ]
    assert b'"key": "1"' in objects["input.jsonl"]  # the first run's input stays: --attach to it still works


def test_a_job_that_ended_after_it_was_listed_is_not_a_teardown_failure(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdxlctl.vertex import batch_inventory
    from sdxlctl.vertex.names import cloud

    config, store = uploaded(cli, emulator, monkeypatch)
    result = vertex_batch.run(config, store, submission(make_batch(1)))
    (job,) = emulator.batch_jobs()
    listed_running = {**job, "state": "JOB_STATE_RUNNING"}  # as the listing saw it, a moment before it ended
    outcomes: list[tuple[str, str]] = []

    def attempt(kind: str, name: str, action: Callable[[], str]) -> bool:
        outcomes.append((name, action()))  # a CloudError here fails the test: teardown would report a failure
        return True

    batch_inventory.teardown(cloud(config), [listed_running], attempt, lambda _: None)
    assert outcomes == [(result.where, "record deleted")]
    assert emulator.batch_jobs() == []
