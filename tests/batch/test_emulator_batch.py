"""The emulator's Vertex AI batch prediction, through google-cloud-aiplatform's GAPIC JobServiceClient (REST)
and google-cloud-storage on the GCS emulator: what sdxlctl's vertex batch code meets."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.emulator.app import create_app
from tests.emulator.core import World
from tests.emulator.model_servers import ModelServers
from tests.emulator_fixtures import PROJECT, REGION, Emulator
from tests.servers import serve_app

PARENT = f"projects/{PROJECT}/locations/{REGION}"
TINY = {"num_inference_steps": 2, "width": 64, "height": 64, "output_format": "png"}
MACHINE = {"machine_type": "g2-standard-8", "accelerator_type": "NVIDIA_L4", "accelerator_count": 1}


def _client(url: str, beta: bool = False) -> Any:
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    if beta:
        from google.cloud import aiplatform_v1beta1 as aip
    else:
        from google.cloud import aiplatform_v1 as aip
    options = ClientOptions(api_endpoint=url)
    return aip.JobServiceClient(credentials=AnonymousCredentials(), transport="rest", client_options=options)


def _model(url: str, display_name: str = "sdxl-model", env: dict[str, str] | None = None) -> str:
    """A Model uploaded as sdxlctl uploads one: a custom container on the default routes."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform_v1 as aip

    models = aip.ModelServiceClient(
        credentials=AnonymousCredentials(), transport="rest", client_options=ClientOptions(api_endpoint=url)
    )
    spec: dict[str, Any] = {
        "image_uri": "europe-docker.pkg.dev/p/r/server:1",
        "predict_route": "/predict",
        "health_route": "/health",
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
    }
    operation = models.upload_model(parent=PARENT, model={"display_name": display_name, "container_spec": spec})
    return str(operation.result(polling=_fast_polling()).model)


def _fast_polling() -> Any:
    """An operation polled every 0.1 s at most, not from 1 s up (the emulator's take 2 polls)."""
    from google.api_core.future.polling import DEFAULT_POLLING

    return DEFAULT_POLLING.with_delay(initial=0.02, maximum=0.1).with_timeout(30)


def _bucket(emulator: Emulator, lines: dict[str, list[dict[str, Any]]]) -> str:
    """A new bucket holding the input files {object name: instances}."""
    name = f"batch-{uuid.uuid4().hex[:12]}"
    bucket = emulator.storage().create_bucket(name)
    for path, instances in lines.items():
        bucket.blob(path).upload_from_string("".join(json.dumps(i) + "\n" for i in instances))
    return name


def _job(model: str, bucket: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "display_name": "sdxl-batch-test",
        "model": model,
        "input_config": {"instances_format": "jsonl", "gcs_source": {"uris": [f"gs://{bucket}/in/*.jsonl"]}},
        "instance_config": {"instance_type": "object", "key_field": "key"},
        "model_parameters": TINY,
        "output_config": {
            "predictions_format": "jsonl",
            "gcs_destination": {"output_uri_prefix": f"gs://{bucket}/raw"},
        },
        "dedicated_resources": {"machine_spec": MACHINE, "starting_replica_count": 1, "max_replica_count": 1},
        "manual_batch_tuning_parameters": {"batch_size": 2},
        "labels": {"sdxlctl-deployment": "sdxl", "managed-by": "sdxlctl"},
    }
    body.update(extra)
    return body


def _wait(jobs: Any, name: str, until: tuple[str, ...] = ("SUCCEEDED", "FAILED", "CANCELLED")) -> Any:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = jobs.get_batch_prediction_job(name=name)
        if job.state.name.removeprefix("JOB_STATE_") in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {name} never reached {until}: {job.state.name}")


def _output(emulator: Emulator, directory: str) -> dict[str, list[dict[str, Any]]]:
    """Every file under the job's output directory, as JSON lines, by file name."""
    bucket, _, prefix = directory.removeprefix("gs://").partition("/")
    return {
        blob.name.removeprefix(prefix + "/"): [json.loads(line) for line in blob.download_as_text().splitlines()]
        for blob in emulator.storage().list_blobs(bucket, prefix=prefix + "/")
    }


PROMPT = {"prompt": "a red cube", "seed": 7}
REFUSED = {"prompt": ""}  # the server refuses an empty prompt (400)


def test_a_job_runs_to_succeeded_in_batches_with_the_output_layout_google_gives(emulator: Emulator) -> None:
    """Batches of batchSize; the refused request's lines in the errors file, the others' predictions keyed."""
    model = _model(emulator.url)
    lines: list[dict[str, Any]] = [{"key": "1", **PROMPT}, {"key": "2", **REFUSED}, {"key": "3", **PROMPT, "seed": 8}]
    bucket = _bucket(emulator, {"in/a.jsonl": lines[:2], "in/b.jsonl": lines[2:], "other/c.jsonl": lines})
    jobs = _client(emulator.url)

    created = jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=_job(model, bucket))
    assert created.name.startswith(f"{PARENT}/batchPredictionJobs/")
    assert created.state.name in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    assert created.manual_batch_tuning_parameters.batch_size == 2
    job = _wait(jobs, created.name)

    assert job.state.name == "JOB_STATE_SUCCEEDED", job.error
    assert job.create_time <= job.start_time <= job.end_time
    stats = job.completion_stats
    assert (stats.successful_count, stats.failed_count, stats.incomplete_count) == (1, 2, 0)
    assert job.resources_consumed.replica_hours > 0
    stamp = job.create_time.strftime("%Y_%m_%dT%H_%M_%S_") + f"{job.create_time.microsecond // 1000:03d}Z"
    directory = job.output_info.gcs_output_directory
    assert directory == f"gs://{bucket}/raw/prediction-sdxl-model-{stamp}"
    files = _output(emulator, directory)
    assert sorted(files) == ["prediction.errors_stats-00000-of-00001", "prediction.results-00000-of-00001"]
    (result,) = files["prediction.results-00000-of-00001"]
    assert result["key"] == "3" and "instance" not in result
    assert result["prediction"]["seeds"] == [8] and result["prediction"]["output_format"] == "png"
    assert [line["key"] for line in files["prediction.errors_stats-00000-of-00001"]] == ["1", "2"]
    for line in files["prediction.errors_stats-00000-of-00001"]:  # one request of two: both lines fail
        assert line["error"]["code"] == 3 and "prompt" in line["error"]["message"]
    # int64 counts are strings in JSON, and zeros are left out (proto3 JSON), as Google writes them
    raw = httpx.get(f"{emulator.url}/v1/{created.name}").json()
    assert raw["completionStats"] == {"successfulCount": "1", "failedCount": "2"}


@dataclass
class StandIn:
    """A stand-in model container: answers 503 to its first request, then a prediction per instance (400 for an
    empty prompt); records every body it receives; holds each answer but the 503 while `gate` is clear."""

    url: str
    bodies: list[Any] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def container() -> Iterator[StandIn]:
    stand_in = StandIn("")
    stand_in.gate.set()

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        stand_in.bodies.append(body)
        if len(stand_in.bodies) == 1:
            return JSONResponse({"error": {"code": 503, "message": "warming up"}}, status_code=503)
        await asyncio.to_thread(stand_in.gate.wait, 30)
        if any(i.get("prompt") == "" for i in body["instances"]):
            return JSONResponse({"error": {"code": 400, "message": "instances[0].prompt: empty"}}, status_code=400)
        return JSONResponse({"predictions": [{"echo": i} for i in body["instances"]]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ready"})

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health)])
    with serve_app(app) as server:
        stand_in.url = server.url
        yield stand_in
        stand_in.gate.set()


@pytest.fixture
def stand_in(gcs: str, container: StandIn) -> Iterator[tuple[Emulator, StandIn]]:
    """An emulator whose jobs' replicas are the stand-in container."""
    world = World()
    with serve_app(create_app(world, servers=ModelServers(forward_to=container.url), gcs_url=gcs)) as server:
        yield Emulator(server.url, gcs, world), container


def test_parameters_both_ways_retries_and_the_status_error_shape(stand_in: tuple[Emulator, StandIn]) -> None:
    emulator, container = stand_in
    bodies = container.bodies
    model = _model(emulator.url)
    lines = [{"key": str(n), "prompt": f"p{n}"} for n in range(1, 6)]
    bucket = _bucket(emulator, {"in/a.jsonl": lines})
    jobs = _client(emulator.url)

    job = _wait(jobs, jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=_job(model, bucket)).name)
    assert job.state.name == "JOB_STATE_SUCCEEDED"
    # the 503 was retried; then 2 + 2 + 1 instances, the key taken out, modelParameters as "parameters"
    assert [len(b["instances"]) for b in bodies] == [2, 2, 2, 1]
    assert bodies[1] == {"instances": [{"prompt": "p1"}, {"prompt": "p2"}], "parameters": TINY}
    results = _output(emulator, job.output_info.gcs_output_directory)["prediction.results-00000-of-00001"]
    assert [(r["key"], r["prediction"]["echo"]["prompt"]) for r in results] == [(str(n), f"p{n}") for n in range(1, 6)]

    bodies.clear()
    emulator.world.batch_sends_parameters = False
    emulator.world.batch_error_shape = "status"
    bucket = _bucket(emulator, {"in/a.jsonl": [{"prompt": "p1"}, {"prompt": ""}]})
    body = _job(model, bucket, manual_batch_tuning_parameters={"batch_size": 1})
    del body["instance_config"]  # no keyField: output lines carry the instance
    job = _wait(jobs, jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=body).name)
    assert job.state.name == "JOB_STATE_SUCCEEDED" and job.completion_stats.failed_count == 1
    assert bodies[1:] == [{"instances": [{"prompt": "p1"}]}, {"instances": [{"prompt": ""}]}]
    files = _output(emulator, job.output_info.gcs_output_directory)
    assert files["prediction.results-00000-of-00001"] == [
        {"instance": {"prompt": "p1"}, "prediction": {"echo": {"prompt": "p1"}}}
    ]
    assert files["prediction.errors_stats-00000-of-00001"] == [
        {"instance": {"prompt": ""}, "error": {"status": "INVALID_ARGUMENT", "message": "instances[0].prompt: empty"}}
    ]


def test_every_line_refused_fails_the_job_with_the_first_error(emulator: Emulator) -> None:
    model = _model(emulator.url)
    bucket = _bucket(emulator, {"in/a.jsonl": [{"key": "1", **REFUSED}]})
    jobs = _client(emulator.url)

    job = _wait(jobs, jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=_job(model, bucket)).name)

    assert job.state.name == "JOB_STATE_FAILED"
    assert job.error.code == 3 and "prompt" in job.error.message
    assert (job.completion_stats.successful_count, job.completion_stats.failed_count) == (0, 1)
    errors = _output(emulator, job.output_info.gcs_output_directory)["prediction.errors_stats-00000-of-00001"]
    assert [line["key"] for line in errors] == ["1"]


def test_a_replica_that_never_becomes_healthy_fails_the_job(gcs: str) -> None:
    world = World(batch_ready_s=0.5)
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    with serve_app(create_app(world, servers=ModelServers(forward_to=dead), gcs_url=gcs)) as server:
        emulator = Emulator(server.url, gcs, world)
        model = _model(emulator.url)
        bucket = _bucket(emulator, {"in/a.jsonl": [{"key": "1", **PROMPT}]})
        jobs = _client(emulator.url)
        created = jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=_job(model, bucket))
        job = _wait(jobs, created.name)
    assert job.state.name == "JOB_STATE_FAILED"
    assert "did not become healthy" in job.error.message
    assert not job.start_time  # it never ran


def test_a_container_that_exits_fails_the_job_with_its_log_and_leaves_no_process(gcs: str, tmp_path: Any) -> None:
    """The job's replica is the container's command as a process (no forward_to), as with a real Model."""
    world = World()
    servers = ModelServers(log_dir=tmp_path)
    with serve_app(create_app(world, servers=servers, gcs_url=gcs)) as server:
        emulator = Emulator(server.url, gcs, world)
        model = _model(emulator.url, env={"SDXL_QUEUE_SIZE": "many"})
        bucket = _bucket(emulator, {"in/a.jsonl": [{"key": "1", **PROMPT}]})
        jobs = _client(emulator.url)
        job = _wait(
            jobs, jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=_job(model, bucket)).name
        )
        assert job.state.name == "JOB_STATE_FAILED"
        assert "failed to start" in job.error.message and "SDXL_QUEUE_SIZE='many' is invalid" in job.error.message
        assert servers.replicas == {}
    assert list(tmp_path.glob("model-batch-*.log"))


def test_cancel_stops_a_running_job_and_only_a_finished_job_is_deleted(emulator: Emulator) -> None:
    from google.api_core import exceptions

    model = _model(emulator.url)
    bucket = _bucket(emulator, {"in/a.jsonl": [{"key": "1", **PROMPT}]})
    jobs = _client(emulator.url)
    emulator.slow("batchPredictionJobs")  # held in RUNNING, nothing sent
    name = jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=_job(model, bucket)).name
    assert _wait(jobs, name, until=("RUNNING",)).completion_stats.incomplete_count == 1

    # FAILED_PRECONDITION is HTTP 400, which api_core raises as BadRequest
    with pytest.raises(exceptions.BadRequest, match="only a finished job"):
        jobs.delete_batch_prediction_job(name=name)
    jobs.cancel_batch_prediction_job(name=name)
    assert jobs.get_batch_prediction_job(name=name).state.name in ("JOB_STATE_CANCELLING", "JOB_STATE_CANCELLED")
    job = _wait(jobs, name)

    assert job.state.name == "JOB_STATE_CANCELLED" and job.error.code == 1 and job.end_time
    assert (job.completion_stats.successful_count, job.completion_stats.incomplete_count) == (0, 1)
    with pytest.raises(exceptions.BadRequest, match="cannot be cancelled"):
        jobs.cancel_batch_prediction_job(name=name)
    jobs.delete_batch_prediction_job(name=name).result(polling=_fast_polling())
    with pytest.raises(exceptions.NotFound):
        jobs.get_batch_prediction_job(name=name)
    assert emulator.batch_jobs() == []


def test_cancel_takes_effect_between_requests_and_keeps_what_was_answered(stand_in: tuple[Emulator, StandIn]) -> None:
    emulator, container = stand_in
    model = _model(emulator.url)
    bucket = _bucket(emulator, {"in/a.jsonl": [{"key": str(n), "prompt": f"p{n}"} for n in range(1, 7)]})
    jobs = _client(emulator.url)
    container.gate.clear()
    name = jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=_job(model, bucket)).name
    deadline = time.monotonic() + 30
    while len(container.bodies) < 2:  # the 503, then the first 2 lines in flight
        assert time.monotonic() < deadline, container.bodies
        time.sleep(0.02)

    jobs.cancel_batch_prediction_job(name=name)
    assert jobs.get_batch_prediction_job(name=name).state.name == "JOB_STATE_CANCELLING"
    container.gate.set()
    job = _wait(jobs, name)

    assert job.state.name == "JOB_STATE_CANCELLED" and len(container.bodies) == 2
    assert (job.completion_stats.successful_count, job.completion_stats.incomplete_count) == (2, 4)
    results = _output(emulator, job.output_info.gcs_output_directory)["prediction.results-00000-of-00001"]
    assert [line["key"] for line in results] == ["1", "2"]


def test_list_filters_by_label_state_and_display_name(emulator: Emulator) -> None:
    model = _model(emulator.url)
    bucket = _bucket(emulator, {"in/a.jsonl": [{"key": "1", **PROMPT}]})
    jobs = _client(emulator.url)
    emulator.slow("batchPredictionJobs")
    ours = jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=_job(model, bucket)).name
    other = _job(model, bucket, display_name="another", labels={"sdxlctl-deployment": "other"})
    theirs = jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=other).name

    def listed(expression: str) -> list[str]:
        return [job.name for job in jobs.list_batch_prediction_jobs(request={"parent": PARENT, "filter": expression})]

    assert listed("labels.sdxlctl-deployment=sdxl") == [ours]
    assert listed('labels.sdxlctl-deployment="other" AND display_name="another"') == [theirs]
    assert listed('labels.sdxlctl-deployment=sdxl AND display_name="another"') == []
    assert listed("") == [ours, theirs]
    pages = jobs.list_batch_prediction_jobs(request={"parent": PARENT, "page_size": 1})
    assert [job.name for job in pages] == [ours, theirs]
    _wait(jobs, ours, until=("RUNNING",))
    jobs.cancel_batch_prediction_job(name=ours)
    _wait(jobs, ours)
    assert listed("state=JOB_STATE_CANCELLED") == [ours]
    assert listed('state!="JOB_STATE_CANCELLED" AND labels.sdxlctl-deployment:*') == [theirs]
    assert {job["name"] for job in emulator.batch_jobs()} == {ours, theirs}
    emulator.finish_batch_jobs()
    assert _wait(jobs, theirs).state.name == "JOB_STATE_SUCCEEDED"


def test_spot_is_a_v1beta1_field(emulator: Emulator) -> None:
    model = _model(emulator.url)
    bucket = _bucket(emulator, {"in/a.jsonl": [{"key": "1", **PROMPT}]})
    body = _job(model, bucket)
    body["dedicated_resources"]["spot"] = True
    beta = _client(emulator.url, beta=True)

    created = beta.create_batch_prediction_job(parent=PARENT, batch_prediction_job=body)

    assert created.dedicated_resources.spot is True
    assert _wait(beta, created.name).state.name == "JOB_STATE_SUCCEEDED"
    (recorded,) = emulator.batch_jobs()
    assert recorded["dedicatedResources"]["spot"] is True
    assert "spot" not in httpx.get(f"{emulator.url}/v1/{created.name}").json()["dedicatedResources"]
    v1 = {"displayName": "x", "model": model, "dedicatedResources": {"spot": True}}
    answer = httpx.post(f"{emulator.url}/v1/{PARENT}/batchPredictionJobs", json=v1)
    assert answer.status_code == 400 and "spot" in answer.json()["error"]["message"]


BAD_JOBS: list[tuple[dict[str, Any], str]] = [
    ({"display_name": ""}, "display_name is required"),
    ({"unmanaged_container_model": {"container_spec": {"image_uri": "i"}}}, "Exactly one of"),
    ({"input_config": {"gcs_source": {"uris": ["gs://b/in.jsonl"]}}}, "instances_format is required"),
    ({"output_config": {"gcs_destination": {"output_uri_prefix": "gs://b/o/"}}}, "predictions_format is required"),
    ({"dedicated_resources": {"machine_spec": {"accelerator_type": "NVIDIA_L4"}}}, "machine_type is required"),
    ({"dedicated_resources": {"machine_spec": {**MACHINE, "machine_type": "n1-standard-4"}}}, "machine_spec: Acc"),
    ({"dedicated_resources": {"machine_spec": MACHINE, "starting_replica_count": 3, "max_replica_count": 2}}, "3 > 2"),
    ({"manual_batch_tuning_parameters": {"batch_size": -1}}, "batch_size must be positive"),
    ({"labels": {"Bad": "x"}}, "labels: 'Bad'"),
    ({"service_account": "nobody@demo-project.iam.gserviceaccount.com"}, "service_account: service account nobody"),
]


def test_a_bad_job_is_refused_naming_its_field(emulator: Emulator) -> None:
    from google.api_core import exceptions

    model = _model(emulator.url)
    jobs = _client(emulator.url)
    for change, message in BAD_JOBS:
        with pytest.raises(exceptions.BadRequest, match=message):
            jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job={**_job(model, "b"), **change})
    with pytest.raises(exceptions.NotFound, match="Model"):
        jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=_job(model + "0", "b"))
    assert emulator.batch_jobs() == []


def test_no_worker_outlives_the_emulator(gcs: str, container: StandIn) -> None:
    import threading

    world = World()
    with serve_app(create_app(world, servers=ModelServers(forward_to=container.url), gcs_url=gcs)) as server:
        emulator = Emulator(server.url, gcs, world)
        model = _model(emulator.url)
        bucket = _bucket(emulator, {"in/a.jsonl": [{"key": "1", **PROMPT}]})
        emulator.slow("batchPredictionJobs")
        jobs = _client(emulator.url)
        name = jobs.create_batch_prediction_job(parent=PARENT, batch_prediction_job=_job(model, bucket)).name
        _wait(jobs, name, until=("RUNNING",))
        assert any(t.name.startswith("batch-") for t in threading.enumerate())
    assert not [t.name for t in threading.enumerate() if t.name.startswith("batch-")]
