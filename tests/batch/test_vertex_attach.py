"""Ctrl-C while a Vertex AI batch job runs leaves it running and recorded; `--attach` waits for that same job
and collects it, with no second job. A real SIGINT to a real `python -m sdxlctl batch`, and KeyboardInterrupt
in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxlctl.batch import Counts
from sdxlctl.errors import DeployError, Interrupted
from sdxlctl.state import StateStore
from sdxlctl.vertex import batch as vertex_batch
from tests.batch.test_vertex_run import gs_objects, make_batch, out, submission, uploaded
from tests.cloud.test_faults import up
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator
from tests.interrupts import interrupt_sdxlctl

SMALL = ["--steps", "2", "--width", "64", "--height", "64", "--format", "png", "--yes"]


def creates(emulator: Emulator) -> int:
    return sum(1 for r in emulator.requests() if r["method"] == "POST" and r["path"].endswith("/batchPredictionJobs"))


def test_keyboard_interrupt_while_waiting_leaves_the_job_recorded_and_attach_collects_it(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    emulator.slow("batchPredictionJobs")

    def progress(counts: Counts) -> None:
        if counts.state == "RUNNING":
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as raised:
        vertex_batch.run(config, store, submission(make_batch(2)), progress=progress)
    (job,) = emulator.batch_jobs()
    assert str(raised.value) == f"interrupted; job {job['name']} keeps running"
    assert "sdxlctl batch --attach" in str(raised.value.hint) and "sdxlctl teardown" in str(raised.value.hint)
    assert job["state"] == "JOB_STATE_RUNNING"
    (recorded,) = [r for k, r in store.read().of("sdxl").items() if k.startswith("batch-")]
    assert recorded.name == job["name"] and recorded.details["state"] == "RUNNING"

    with pytest.raises(DeployError, match="not collected yet") as refused:  # --retry-failed before --attach
        vertex_batch.previous_rows(config, store, Path("prompts.txt"))
    assert "sdxlctl batch --attach --job " + job["name"].rsplit("/", 1)[-1] in str(refused.value.hint)

    emulator.finish_batch_jobs()
    result = vertex_batch.attach(config, store, None)
    assert (result.where, result.state, result.done, result.out) == (job["name"], "SUCCEEDED", 2, out())
    assert creates(emulator) == 1 and len(emulator.batch_jobs()) == 1
    assert {"images/000001.png", "images/000002.png", "manifest.jsonl"} <= set(gs_objects(emulator, out()))


def test_sigint_to_the_cli_then_attach_waits_for_the_same_job(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload")
    (tmp_path / "prompts.txt").write_text("a red fox\na blue bird\n")
    emulator.slow("batchPredictionJobs")

    def polled_running() -> bool:
        return any(j["state"] == "JOB_STATE_RUNNING" for j in emulator.batch_jobs()) and any(
            r["method"] == "GET" and "/batchPredictionJobs/" in r["path"] for r in emulator.requests()
        )

    stderr = interrupt_sdxlctl(
        ["batch", "prompts.txt", *SMALL], cwd=tmp_path, env=env, ready=polled_running, never="the job never ran"
    )
    assert "--attach" in stderr, stderr
    (job,) = emulator.batch_jobs()
    assert job["name"] in stderr
    kinds = [k for k in StateStore(tmp_path / ".sdxlctl").read().of("sdxl") if k.startswith("batch-")]
    assert len(kinds) == 1

    emulator.finish_batch_jobs()
    attached = cli("batch", "--attach", "--json", env=env)
    assert attached.code == 0, attached.err
    assert creates(emulator) == 1 and len(emulator.batch_jobs()) == 1
    assert job["name"] in attached.out
    manifest = gs_objects(emulator, json.loads(attached.out)["out"])["manifest.jsonl"]
    assert [json.loads(line)["prompt"] for line in manifest.decode().splitlines()] == ["a red fox", "a blue bird"]
