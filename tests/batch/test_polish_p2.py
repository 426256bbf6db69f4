"""Polish P2 of issue 18: an output line too long to hold is skipped, not read whole; a gs:// folder holding
another file's batch is refused before anything is uploaded; a job long in PENDING says why once; a create that
finally fails says a job may exist; the price counts only replicas that can have work; Spot's meaning says a job
may take longer or fail. Against the emulator, through the real client libraries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxlctl.batch import Counts
from sdxlctl.errors import Interrupted, SdxlctlError
from sdxlctl.pricing import batch as pricing_batch
from sdxlctl.vertex import batch as vertex_batch
from tests.batch.test_vertex_run import make_batch, submission, uploaded
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator


def test_one_image_is_charged_one_replica_start_not_fifty() -> None:
    one = pricing_batch.batch_estimate("l4", "us-central1", images=1, replicas=50)
    alone = pricing_batch.batch_estimate("l4", "us-central1", images=1, replicas=1)
    assert one.replica_hours == pytest.approx(alone.replica_hours)
    assert one.replicas == 50  # the most the job may run, as the plan shows
    # min_replicas start whether or not they get work
    held = pricing_batch.batch_estimate("l4", "us-central1", images=1, replicas=50, min_replicas=3)
    assert held.replica_hours == pytest.approx(alone.replica_hours + 2 * pricing_batch.REPLICA_START_H)
    # as many requests as replicas: each replica can have one
    size = one.batch_size
    many = pricing_batch.batch_estimate("l4", "us-central1", images=size * 50 * 10, replicas=50)
    work = size * 500 * many.seconds_per_image / 3600
    assert many.replica_hours == pytest.approx(work + 50 * pricing_batch.REPLICA_START_H)


def test_spot_meaning_says_a_job_may_take_longer_or_fail_and_what_reruns_it() -> None:
    meaning = pricing_batch.SPOT_MEANING
    assert "longer" in meaning and "FAILED" in meaning and "--retry-failed" in meaning


def test_a_create_that_finally_fails_says_a_job_may_exist(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    config.gcp.retry_s = 1.0  # give up soon
    emulator.fault(
        method="POST", path=r"/batchPredictionJobs$", answer="error", code=503, status="UNAVAILABLE", times=50
    )
    with pytest.raises(SdxlctlError) as failed:
        vertex_batch.run(config, store, submission(make_batch(1)))
    emulator.clear_faults()
    said = f"{failed.value} {failed.value.hint}"
    assert "a job may have been created" in said and "sdxlctl status" in said and "sdxlctl teardown" in said


def test_a_job_long_pending_says_once_why_and_what_ctrl_c_and_teardown_do(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdxlctl.gcp.batch import Jobs
    from sdxlctl.vertex.names import cloud

    config, store = uploaded(cli, emulator, monkeypatch)
    monkeypatch.setattr(vertex_batch, "QUEUED_NOTICE_S", 0.0)
    emulator.slow("batchPredictionJobs:pending")
    said: list[str] = []
    polls: list[str] = []

    def stop_after_pending_polls(counts: Counts) -> None:
        polls.append(counts.state)
        if polls.count("PENDING") >= 4:
            raise KeyboardInterrupt

    try:
        with pytest.raises(Interrupted):
            vertex_batch.run(
                config, store, submission(make_batch(1)), progress=stop_after_pending_polls, say=said.append
            )
    finally:
        with emulator.world.lock:
            emulator.world.slow.pop("batchPredictionJobs:pending", None)
    (job,) = emulator.batch_jobs()
    Jobs(cloud(config)).cancel(job["name"])
    notices = [line for line in said if "short of" in line]
    assert len(notices) == 1, said
    (notice,) = notices
    assert "NVIDIA_L4" in notice and config.gcp.region in notice
    assert "Ctrl-C leaves it queued" in notice and "sdxlctl teardown" in notice


def test_an_output_line_over_the_cap_is_skipped_unread_and_fails_its_line(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    from sdxlctl.batch import manifest
    from sdxlctl.gcp.session import Cloud
    from sdxlctl.gcp.storage import HEAD_CHARS, LongLine, Storage
    from sdxlctl.vertex import batch_output
    from tests.batch.test_vertex_run import BUCKET
    from tests.emulator_fixtures import PROJECT, REGION

    for key, value in emulator.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(batch_output, "IMAGE_CHARS_MOST", 4000)  # one image's base64 at most
    monkeypatch.setattr(batch_output, "LINE_ROOM", 1000)
    c = Cloud(PROJECT, REGION, emulator.url, 0.05, 5.0)
    out = f"gs://{BUCKET}/batch/sdxl/long-{uuid.uuid4().hex[:8]}/"
    directory = out + "raw/prediction-m-1/"
    huge = "A" * 100_000
    text = "\n".join(
        [
            json.dumps({"key": "1", "error": {"code": 3, "message": "bad prompt"}}),
            json.dumps({"key": "2", "prediction": {"images": [huge]}}),
            json.dumps({"prediction": {"images": [huge]}, "instance": {"prompt": "x"}}),
        ]
    )
    storage = Storage(c, BUCKET, {})
    storage.ensure_bucket()
    storage.upload(directory.removeprefix(f"gs://{BUCKET}/") + "prediction.results-00000-of-00001", text.encode())
    said: list[str] = []
    job = {"name": "job", "outputInfo": {"gcsOutputDirectory": directory}}
    done, failed = batch_output.collect(c, job, make_batch(3), out, None, said.append)
    errors = {row.line: row.error for row in failed}
    assert done == 0 and str(errors[1]).startswith("bad prompt") and errors[3] == manifest.NO_ANSWER
    assert "not read" in str(errors[2]) and "characters" in str(errors[2])
    assert any("results-00000-of-00001 line 3" in line and "not read" in line for line in said), said
    name = directory.removeprefix(f"gs://{BUCKET}/") + "prediction.results-00000-of-00001"
    read = list(storage.lines(name, limit=5000))
    assert (
        isinstance(read[1], LongLine) and len(read[1].head) <= HEAD_CHARS and read[1].chars == len(text.split("\n")[1])
    )
    assert read[0] == text.split("\n")[0] and isinstance(read[2], LongLine)


def test_a_gs_out_folder_holding_another_files_batch_is_refused_before_any_upload(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import dataclasses

    from sdxlctl.errors import UsageError
    from tests.batch.test_vertex_attach import creates
    from tests.batch.test_vertex_run import gs_objects, out

    config, store = uploaded(cli, emulator, monkeypatch)
    first = dataclasses.replace(make_batch(1), source=tmp_path / "a" / "prompts.txt")
    assert vertex_batch.run(config, store, submission(first)).state == "SUCCEEDED"
    before = gs_objects(emulator, out())
    assert json.loads(before["batch.json"]) == {"source": str(tmp_path / "a" / "prompts.txt")}
    other = dataclasses.replace(make_batch(2), source=tmp_path / "b" / "prompts.txt")
    with pytest.raises(UsageError) as raised:
        vertex_batch.run(config, store, submission(other))
    assert raised.value.message == (
        f"--out {out()} holds the batch of {tmp_path / 'a' / 'prompts.txt'}, not of {tmp_path / 'b' / 'prompts.txt'}"
    )
    assert "--out" in (raised.value.hint or "")
    assert creates(emulator) == 1 and gs_objects(emulator, out()) == before
    # the same file again (edited, or --retry-failed): its own folder
    again = dataclasses.replace(make_batch(2), source=tmp_path / "a" / "prompts.txt")
    assert vertex_batch.run(config, store, submission(again, retry_of="x")).state == "SUCCEEDED"
