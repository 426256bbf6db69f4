"""Vertex AI batch prediction jobs (JobService), v1 and v1beta1, as Google serves them.

create returns the job itself (not an operation) and a worker runs it (batch_runner.py): the model's
container as a replica (ModelServers), the input read from the GCS emulator, the output written there.
Clients poll `state`. cancel is asynchronous (CANCELLING, then CANCELLED between two requests); delete is
an operation, and only for a finished job. Validation follows the proto and Google's documented rules; a
field only v1beta1 has (dedicatedResources.spot) is an unknown field on /v1/, as Google's v1 refuses it.
Deviations: a job is never JOB_STATE_QUEUED here (there is no quota to wait for): it starts PENDING. It runs
on one replica, one request at a time, whatever its replica counts (which scale resourcesConsumed.replicaHours).
Only jsonl input and output and instanceType object are run; the others are refused naming the field.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any, NoReturn

from starlette.requests import Request

from tests.emulator.batch_runner import FINISHED, JobRunner
from tests.emulator.core import ApiError, Route, World, now, packed, parse, routes
from tests.emulator.model_servers import ModelServers
from tests.emulator.vertex import _check_machine

PARENT = r"/(?P<version>v1|v1beta1)/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
JOB = PARENT + r"/batchPredictionJobs/(?P<job>[^/:]+)"
TABLE = "batchPredictionJobs"
DEFAULT_BATCH_SIZE = 64  # manual_batch_tuning_parameters.batch_size: "The default value is 64."
DEFAULT_MAX_REPLICAS = 10  # BatchDedicatedResources.max_replica_count: "default 10"
OUTPUT_ONLY = (
    "name",
    "modelVersionId",
    "outputInfo",
    "state",
    "error",
    "partialFailures",
    "resourcesConsumed",
    "completionStats",
    "createTime",
    "startTime",
    "endTime",
    "updateTime",
)
LABEL = re.compile(r"[a-z0-9_-]{0,64}")
LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")


def _types(version: str) -> Any:
    if version == "v1beta1":
        from google.cloud.aiplatform_v1beta1 import types
    else:
        from google.cloud.aiplatform_v1 import types
    return types


class BatchJobs:
    """The JobService routes for batch prediction; `runner` runs the jobs."""

    def __init__(self, world: World, servers: ModelServers, gcs_url: str | None) -> None:
        self.world = world
        self.runner = JobRunner(world, servers, gcs_url)

    def routes(self) -> list[Route]:
        return routes(
            [
                ("POST", PARENT + r"/batchPredictionJobs", self.create),
                ("GET", PARENT + r"/batchPredictionJobs", self.list),
                ("GET", JOB, self.get),
                ("POST", JOB + r":cancel", self.cancel),
                ("DELETE", JOB, self.delete),
            ]
        )

    def stop_all(self) -> None:
        """Every job's worker stops (the emulator stops or resets); the jobs stay as they were."""
        self.runner.stop_all()

    # ------------------------------------------------------------------ routes

    def create(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        types = _types(p["version"])
        job = parse(types.BatchPredictionJob, body, "BatchPredictionJob")
        for key in OUTPUT_ONLY:  # output only: ignored when sent, as Google ignores them
            job.pop(key, None)
        parent = f"projects/{p['project']}/locations/{p['location']}"
        model = self._check(job, parent)
        name = f"{parent}/batchPredictionJobs/{self.world.new_id()}"
        stamp = now()
        resources = job.setdefault("dedicatedResources", {})
        resources.setdefault("maxReplicaCount", DEFAULT_MAX_REPLICAS)
        job.setdefault("manualBatchTuningParameters", {}).setdefault("batchSize", DEFAULT_BATCH_SIZE)
        record = {
            **job,
            "name": name,
            "state": "JOB_STATE_PENDING",
            "createTime": stamp,
            "updateTime": stamp,
            "_model": model,
        }
        if model.get("versionId"):
            record["modelVersionId"] = model["versionId"]
        self.world.table(TABLE)[name] = record
        self.runner.start(name)
        return self._answer(record, p["version"])

    def get(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return self._answer(self._job(p), p["version"])

    def list(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        parent = f"projects/{p['project']}/locations/{p['location']}/"
        keep = job_filter(request.query_params.get("filter", ""))
        jobs = [j for n, j in self.world.table(TABLE).items() if n.startswith(parent) and keep(j)]
        size = _int(request.query_params.get("pageSize") or "0", "page_size") or 100
        start = _int(request.query_params.get("pageToken") or "0", "page_token")
        page = [self._answer(j, p["version"]) for j in jobs[start : start + size]]
        answer: dict[str, Any] = {"batchPredictionJobs": page} if page else {}
        if start + size < len(jobs):
            answer["nextPageToken"] = str(start + size)
        return answer

    def cancel(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        job = self._job(p)
        if job["state"] in FINISHED:
            raise ApiError(
                400,
                f"BatchPredictionJob {job['name']} is in state {job['state']} and cannot be cancelled.",
                "FAILED_PRECONDITION",
            )
        if job["state"] != "JOB_STATE_CANCELLING":
            job["state"], job["updateTime"] = "JOB_STATE_CANCELLING", now()
        return {}

    def delete(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        job = self._job(p)
        if job["state"] not in FINISHED:
            raise ApiError(
                400,
                f"BatchPredictionJob {job['name']} is in state {job['state']}; only a finished job can be deleted "
                "(cancel it first).",
                "FAILED_PRECONDITION",
            )
        fault = self.world.take_fault("DELETE", request.url.path, operation=True)
        if fault is None:
            del self.world.table(TABLE)[job["name"]]
        types = _types(p["version"])
        parent = f"projects/{p['project']}/locations/{p['location']}"
        return self.world.start_operation(
            f"{parent}/operations/{self.world.new_id()}",
            packed(types.DeleteOperationMetadata, {"genericMetadata": {"createTime": now()}}),
            lambda: {"@type": "type.googleapis.com/google.protobuf.Empty"},
            fault=fault,
        )

    # ------------------------------------------------------------------ helpers

    def _job(self, p: dict[str, str]) -> dict[str, Any]:
        name = f"projects/{p['project']}/locations/{p['location']}/batchPredictionJobs/{p['job']}"
        return self.world.get(TABLE, name, "BatchPredictionJob")

    def _answer(self, job: dict[str, Any], version: str) -> dict[str, Any]:
        """The job as `version` shows it: v1 has no spot (a v1beta1 job read through v1 shows none)."""
        public = {k: copy.deepcopy(v) for k, v in job.items() if not k.startswith("_")}
        if version == "v1":
            public.get("dedicatedResources", {}).pop("spot", None)
        return parse(_types(version).BatchPredictionJob, public, "response")

    def _check(self, job: dict[str, Any], parent: str) -> dict[str, Any]:
        """Google's create-time checks, each naming its field; returns the model version the job runs."""
        if not job.get("displayName"):
            _invalid("batch_prediction_job.display_name is required.")
        if len(job["displayName"]) > 128:
            _invalid("batch_prediction_job.display_name must be at most 128 characters.")
        if bool(job.get("model")) == bool(job.get("unmanagedContainerModel")):
            _invalid(
                "Exactly one of batch_prediction_job.model and batch_prediction_job.unmanaged_container_model "
                "must be set."
            )
        model = self._model(job, parent)
        inputs, outputs = job.get("inputConfig") or {}, job.get("outputConfig") or {}
        if not inputs.get("instancesFormat"):
            _invalid("batch_prediction_job.input_config.instances_format is required.")
        if inputs["instancesFormat"] != "jsonl":
            _invalid(
                f"batch_prediction_job.input_config.instances_format {inputs['instancesFormat']!r} is not "
                "supported by this emulator (jsonl only)."
            )
        uris = (inputs.get("gcsSource") or {}).get("uris") or []
        if not uris:
            _invalid("batch_prediction_job.input_config.gcs_source.uris is required.")
        for i, uri in enumerate(uris):
            if not re.fullmatch(r"gs://[^/]+/.+", uri):
                _invalid(f"batch_prediction_job.input_config.gcs_source.uris[{i}] must be gs://BUCKET/OBJECT: {uri!r}")
        if not outputs.get("predictionsFormat"):
            _invalid("batch_prediction_job.output_config.predictions_format is required.")
        if outputs["predictionsFormat"] != "jsonl":
            _invalid(
                f"batch_prediction_job.output_config.predictions_format {outputs['predictionsFormat']!r} is "
                "not supported by this emulator (jsonl only)."
            )
        prefix = (outputs.get("gcsDestination") or {}).get("outputUriPrefix", "")
        if not re.fullmatch(r"gs://[^/]+(/.*)?", prefix):
            _invalid(
                f"batch_prediction_job.output_config.gcs_destination.output_uri_prefix must be gs://BUCKET/"
                f"PREFIX: {prefix!r}"
            )
        config = job.get("instanceConfig") or {}
        if config.get("instanceType", "object") != "object":
            _invalid("batch_prediction_job.instance_config.instance_type: only 'object' is supported by this emulator.")
        if config.get("includedFields") and config.get("excludedFields"):
            _invalid(
                "batch_prediction_job.instance_config: included_fields and excluded_fields are mutually exclusive."
            )
        self._check_resources(job, model)
        for key, value in (job.get("labels") or {}).items():
            if not LABEL_KEY.fullmatch(key) or not LABEL.fullmatch(value):
                _invalid(
                    f"batch_prediction_job.labels: {key!r}: {value!r}: keys and values are at most 64 "
                    "lowercase letters, digits, '_' or '-' (keys start with a letter)."
                )
        account = job.get("serviceAccount", "")
        if account and account not in self.world.table("accounts"):
            _invalid(f"batch_prediction_job.service_account: service account {account} does not exist.")
        return model

    def _model(self, job: dict[str, Any], parent: str) -> dict[str, Any]:
        if job.get("unmanagedContainerModel"):
            unmanaged = job["unmanagedContainerModel"]
            if not (unmanaged.get("containerSpec") or {}).get("imageUri"):
                _invalid("batch_prediction_job.unmanaged_container_model.container_spec.image_uri is required.")
            return {"displayName": job["displayName"], **unmanaged}
        name, _, version = job["model"].partition("@")
        if not name.startswith(f"{parent}/models/"):
            _invalid(f"batch_prediction_job.model must be {parent}/models/MODEL: {job['model']!r}")
        model = self.world.get("models", name, "Model")
        versions = model.get("_versions", {})
        found = versions.get(version or model["versionId"]) or next(
            (v for v in versions.values() if version in v.get("versionAliases", [])), None
        )
        if found is None:
            raise ApiError(404, f"Model {job['model']} not found.")
        return copy.deepcopy({k: v for k, v in found.items() if not k.startswith("_")})

    def _check_resources(self, job: dict[str, Any], model: dict[str, Any]) -> None:
        resources = job.get("dedicatedResources") or {}
        if not resources.get("machineSpec") and "DEDICATED_RESOURCES" in model.get(
            "supportedDeploymentResourcesTypes", ["DEDICATED_RESOURCES"]
        ):
            _invalid(
                f"batch_prediction_job.dedicated_resources is required: Model {model.get('name', '')} does "
                "not support AUTOMATIC_RESOURCES."
            )
        machine = resources.get("machineSpec") or {}
        if not machine.get("machineType"):
            _invalid("batch_prediction_job.dedicated_resources.machine_spec.machine_type is required.")
        try:
            _check_machine(machine)
        except ApiError as exc:
            _invalid(f"batch_prediction_job.dedicated_resources.machine_spec: {exc.message}")
        low, high = resources.get("startingReplicaCount", 0), resources.get("maxReplicaCount", DEFAULT_MAX_REPLICAS)
        if low < 0 or high < 1 or low > high:
            _invalid(
                "batch_prediction_job.dedicated_resources: starting_replica_count must be between 0 and "
                f"max_replica_count ({low} > {high})."
            )
        size = (job.get("manualBatchTuningParameters") or {}).get("batchSize", 0)
        if size < 0:
            _invalid(f"batch_prediction_job.manual_batch_tuning_parameters.batch_size must be positive: {size}")


def job_filter(expression: str) -> Callable[[dict[str, Any]], bool]:
    """The List filter's terms sdxlctl and the SDK use, joined by AND: labels.KEY=VALUE, labels.KEY:*,
    state=/!=, display_name=/!= and model_display_name=/!= (values quoted or not)."""
    checks: list[Callable[[dict[str, Any]], bool]] = []
    for term in (t.strip() for t in re.split(r"\s+AND\s+", expression.strip())):
        if not term:
            continue
        match = re.fullmatch(r'(labels\.[\w-]+|state|display_name|model_display_name)\s*(=|!=|:)\s*"?([^"]*)"?', term)
        if not match:
            raise ApiError(400, f"Unsupported filter: {term!r}")
        checks.append(_term(*match.groups()))
    return lambda job: all(check(job) for check in checks)


def _term(field: str, op: str, value: str) -> Callable[[dict[str, Any]], bool]:
    def actual(job: dict[str, Any]) -> str | None:
        if field.startswith("labels."):
            return (job.get("labels") or {}).get(field.removeprefix("labels."))
        if field == "model_display_name":
            return str(job.get("_model", {}).get("displayName", ""))
        return str(job.get({"state": "state", "display_name": "displayName"}[field], ""))

    if op == ":":
        if value != "*":
            raise ApiError(400, f"Unsupported filter: {field}:{value} (only {field}:* is)")
        return lambda job: actual(job) is not None
    if op == "!=":
        return lambda job: actual(job) != value
    return lambda job: actual(job) == value


def _int(text: str, field: str) -> int:
    if not text.isdigit():
        _invalid(f"{field} must be a non-negative number: {text!r}")
    return int(text)


def _invalid(message: str) -> NoReturn:
    raise ApiError(400, message)
