"""`sdxlctl batch` on target vertex (vertex.batch.run) against the emulator: the job body as the emulator received
it, the record written before the wait, one job after a lost create answer, and the output made into images and a
manifest in gs:// and on disk. Through the real google-cloud-aiplatform and google-cloud-storage libraries."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdxlctl.batch import Batch, Counts, Line, Submission
from sdxlctl.config import Config, load_config
from sdxlctl.state import StateStore
from sdxlctl.vertex import batch as vertex_batch
from sdxlctl.vertex.names import server_account
from tests.cloud.test_faults import up
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, Emulator

BUCKET = f"{PROJECT}-sdxlctl"
_OUT = [f"gs://{BUCKET}/batch/sdxl/prompts-{uuid.uuid4().hex[:8]}/"]


def out() -> str:
    """This test's output folder: the GCS emulator lives as long as the session, so each test has its own."""
    return _OUT[0]


SMALL = {"num_inference_steps": 2, "width": 64, "height": 64, "output_format": "png"}


def make_batch(n: int = 3, parameters: dict[str, Any] | None = None) -> Batch:
    lines = tuple(Line(i, {"prompt": f"a red fox, number {i}", "seed": 100 + i}) for i in range(1, n + 1))
    return Batch(Path("prompts.txt"), lines, dict(SMALL if parameters is None else parameters))


def submission(batch: Batch, **changes: Any) -> Submission:
    fields: dict[str, Any] = {
        "out": out(),
        "gpu": "l4",
        "replicas": (1, 2),
        "batch_size": 2,
        "usd_per_replica_hour": 2.0,
        **changes,
    }
    return Submission(batch, **fields)


def uploaded(cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> tuple[Config, StateStore]:
    """build + upload through the CLI, then the emulator's env in this process for direct calls."""
    env = emulator.env()
    _OUT[0] = f"gs://{BUCKET}/batch/sdxl/prompts-{uuid.uuid4().hex[:8]}/"
    up(cli, env, "build", "upload")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_config(None, environ=env), StateStore(Path.cwd() / ".sdxlctl")


def gs_objects(emulator: Emulator, prefix: str) -> dict[str, bytes]:
    bucket = emulator.storage().bucket(BUCKET)
    folder = prefix.removeprefix(f"gs://{BUCKET}/")
    return {b.name.removeprefix(folder): b.download_as_bytes() for b in bucket.list_blobs(prefix=folder)}


def test_the_job_as_the_emulator_received_it_and_its_images_and_manifest(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    account = server_account(config)
    assert account, "the default config runs the server as its own account (it writes the compile cache)"
    batch = make_batch(3)
    result = vertex_batch.run(config, store, submission(batch, download=tmp_path / "copy"))

    (job,) = emulator.batch_jobs()
    model = store.read().get("sdxl", "model")
    assert model is not None and job["model"] == model.name
    assert job["inputConfig"] == {"instancesFormat": "jsonl", "gcsSource": {"uris": [out() + "input.jsonl"]}}
    assert job["instanceConfig"] == {"instanceType": "object", "keyField": "key"}
    assert job["modelParameters"] == SMALL
    assert job["outputConfig"]["gcsDestination"]["outputUriPrefix"] == out() + "raw/"
    resources = job["dedicatedResources"]
    assert resources["machineSpec"] == {
        "machineType": "g2-standard-8",
        "acceleratorType": "NVIDIA_L4",
        "acceleratorCount": 1,
    }
    assert (resources["startingReplicaCount"], resources["maxReplicaCount"]) == (1, 2)
    assert "spot" not in resources
    assert int(job["manualBatchTuningParameters"]["batchSize"]) == 2
    assert job["serviceAccount"] == account
    stamp = job["labels"]["sdxlctl-batch"]
    assert job["labels"] == {"sdxlctl-deployment": "sdxl", "managed-by": "sdxlctl", "sdxlctl-batch": stamp}
    assert job["displayName"] == f"sdxl-batch-prompts-{stamp}"

    assert (result.state, result.done, result.failed, result.where, result.out) == (
        "SUCCEEDED",
        3,
        [],
        job["name"],
        out(),
    )
    recorded = store.read().get("sdxl", f"batch-{stamp}")
    assert recorded is not None and recorded.name == job["name"]
    assert recorded.details["state"] == "SUCCEEDED" and recorded.details["lines"] == 3

    objects = gs_objects(emulator, out())
    assert {"images/000001.png", "images/000002.png", "images/000003.png", "manifest.jsonl", "input.jsonl"} <= set(
        objects
    )
    rows = [json.loads(line) for line in objects["manifest.jsonl"].decode().splitlines()]
    assert [(r["line"], r["seed"], r["images"], r["error"]) for r in rows] == [
        (i, 100 + i, [f"images/{i:06d}.png"], None) for i in (1, 2, 3)
    ]
    assert rows[0]["prompt"] == "a red fox, number 1" and rows[0]["parameters"]["width"] == 64
    copy = tmp_path / "copy"
    assert (copy / "manifest.jsonl").read_bytes() == objects["manifest.jsonl"]
    for i in (1, 2, 3):
        assert (copy / f"images/{i:06d}.png").read_bytes() == objects[f"images/{i:06d}.png"]
        with Image.open(copy / f"images/{i:06d}.png") as image:
            assert image.size == (64, 64)

    # --download again (a resumed copy): files already there with the right size are not written again
    before = {p: p.stat().st_mtime_ns for p in (copy / "images").iterdir()}
    (copy / "images/000002.png").unlink()
    again = vertex_batch.attach(config, store, None, download=copy)
    assert again.where == job["name"] and len(emulator.batch_jobs()) == 1
    assert (copy / "images/000002.png").read_bytes() == objects["images/000002.png"]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.name != "000002.png")


def test_the_job_is_recorded_before_the_wait(cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    seen: list[tuple[str, list[str]]] = []

    def progress(counts: Counts) -> None:  # the first poll: the job must be in the state file already
        if not seen:
            recorded = [r.name for k, r in store.read().of("sdxl").items() if k.startswith("batch-")]
            seen.append((counts.state, recorded))

    result = vertex_batch.run(config, store, submission(make_batch(2)), progress=progress)
    (job,) = emulator.batch_jobs()
    assert seen == [(seen[0][0], [job["name"]])] and seen[0][0] != "SUCCEEDED"
    assert result.state == "SUCCEEDED"


def test_a_lost_create_answer_makes_one_job(cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    emulator.fault(
        method="POST", path=r"/batchPredictionJobs$", after=True, answer="error", code=500, status="INTERNAL"
    )
    result = vertex_batch.run(config, store, submission(make_batch(2)))
    creates = [r for r in emulator.requests() if r["method"] == "POST" and r["path"].endswith("/batchPredictionJobs")]
    assert len(creates) == 1  # found by its sdxlctl-batch label, not sent again
    (job,) = emulator.batch_jobs()
    assert result.where == job["name"] and result.state == "SUCCEEDED" and result.done == 2


def test_no_uploaded_model_says_what_to_run(cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdxlctl.errors import DeployError

    for key, value in emulator.env().items():
        monkeypatch.setenv(key, value)
    config, store = load_config(None, environ=emulator.env()), StateStore(Path.cwd() / ".sdxlctl")
    with pytest.raises(DeployError, match="no model") as raised:
        vertex_batch.run(config, store, submission(make_batch(1)))
    assert "sdxlctl upload" in str(raised.value.hint)
    assert emulator.batch_jobs() == []


def test_a_spot_job_goes_through_v1beta1_with_spot_replicas(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    result = vertex_batch.run(config, store, submission(make_batch(1), spot=True))
    (job,) = emulator.batch_jobs()
    assert job["dedicatedResources"]["spot"] is True and result.state == "SUCCEEDED"
    posted = [r["path"] for r in emulator.requests() if r["method"] == "POST" and "batchPredictionJobs" in r["path"]]
    assert [path.split("/")[1] for path in posted] == ["v1beta1"]  # spot is no field of v1's BatchDedicatedResources
    recorded = [r for k, r in store.read().of("sdxl").items() if k.startswith("batch-")]
    assert [r.details["spot"] for r in recorded] == [True]
