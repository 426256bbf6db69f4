"""Runs the emulator's batch prediction jobs, one worker thread each, as Vertex AI runs them.

PENDING: the model's container starts as a replica (ModelServers.start_for_job; with `forward_to`, the
shared server) and must become healthy within `world.batch_ready_s`, else the job FAILS. The input
(JSONL, gcsSource.uris, wildcards too) is read from the GCS emulator. RUNNING: `batchSize` instances a
request to the predict route, {"instances": [...], "parameters": modelParameters} (without "parameters"
when `world.batch_sends_parameters` is False: Google's batch docs do not say it sends them). instanceConfig
keyField is taken out of each instance and comes back as the output line's "key" (else the line carries
"instance"). A 429 or 503 is retried with backoff; any other refusal fails every instance of that request
with the server's message (`world.batch_error_shape`: "code" gives google.rpc.Status {code, message},
"status" PredictionResult.Error {status, message}). Output: prediction.results-00000-of-00001 and
prediction.errors_stats-00000-of-00001 under <outputUriPrefix>prediction-<model>-<createTime>/.
All instances failed: FAILED with the first failure; some: SUCCEEDED with failedCount. Cancel takes effect
between two requests. While `world.slow` has "batchPredictionJobs" a RUNNING job sends nothing (a test
interrupts a client then; Emulator.finish_batch_jobs releases it). While it has "batchPredictionJobs:pending"
a job stays PENDING before its replica starts (no capacity for its GPU: Vertex AI queues it).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from tests.emulator.core import World, now
from tests.emulator.model_servers import ModelServers, Replica

TABLE = "batchPredictionJobs"
FINISHED = {
    "JOB_STATE_SUCCEEDED",
    "JOB_STATE_FAILED",
    "JOB_STATE_CANCELLED",
    "JOB_STATE_PARTIALLY_SUCCEEDED",
    "JOB_STATE_EXPIRED",
}
RESULTS = "prediction.results-00000-of-00001"
ERRORS = "prediction.errors_stats-00000-of-00001"
# HTTP status of the container's answer -> google.rpc.Code (name, number)
GRPC = {
    400: ("INVALID_ARGUMENT", 3),
    401: ("UNAUTHENTICATED", 16),
    403: ("PERMISSION_DENIED", 7),
    404: ("NOT_FOUND", 5),
    408: ("DEADLINE_EXCEEDED", 4),
    409: ("ABORTED", 10),
    413: ("INVALID_ARGUMENT", 3),
    429: ("RESOURCE_EXHAUSTED", 8),
    499: ("CANCELLED", 1),
    501: ("UNIMPLEMENTED", 12),
    503: ("UNAVAILABLE", 14),
    504: ("DEADLINE_EXCEEDED", 4),
}
RETRIED = {429, 503}
RETRIES = 4  # then the request's instances fail
REQUEST_TIMEOUT_S = 600.0
SLOW_KEY = "batchPredictionJobs"
PENDING_KEY = "batchPredictionJobs:pending"


class Stopped(Exception):
    """The emulator stops (or resets): the worker ends and leaves the job as it is."""


class JobError(Exception):
    """The whole job fails with this google.rpc.Status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.status = {"code": code, "message": message}


@dataclass
class Item:
    """One input line: what the output line names it by (key or instance), what the model gets, or why not."""

    ident: dict[str, Any]
    instance: Any = None
    error: tuple[int, str] | None = None  # (HTTP-like status, message)


class JobRunner:
    """One worker thread per job; `stop_all` ends them all (no thread or replica outlives the emulator)."""

    def __init__(self, world: World, servers: ModelServers, gcs_url: str | None) -> None:
        self.world, self.servers, self.gcs_url = world, servers, gcs_url
        self._workers: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._guard = threading.Lock()

    def start(self, name: str) -> None:
        stop = threading.Event()
        thread = threading.Thread(target=self._run, args=(name, stop), name=f"batch-{_id(name)}", daemon=True)
        with self._guard:
            self._workers[name] = (thread, stop)
        thread.start()

    def stop_all(self) -> None:
        """Ends every worker; call it without holding world.lock (a worker may be waiting for it)."""
        with self._guard:
            workers = list(self._workers.values())
            self._workers.clear()
        for _, stop in workers:
            stop.set()
        for thread, _ in workers:
            thread.join(timeout=30)

    # ------------------------------------------------------------------ the worker

    def _run(self, name: str, stop: threading.Event) -> None:
        try:
            self._work(name, stop)
        except Stopped:
            pass
        except JobError as exc:
            self._end(name, "JOB_STATE_FAILED", exc.status)
        except Exception as exc:  # an emulator bug shows as the job's error, never as a silent dead thread
            self._end(name, "JOB_STATE_FAILED", {"code": 13, "message": f"internal error: {exc!r}"})
        finally:
            self.servers.stop(f"batch-{_id(name)}")
            with self._guard:
                if self._workers.get(name, (None,))[0] is threading.current_thread():
                    del self._workers[name]

    def _work(self, name: str, stop: threading.Event) -> None:
        with self.world.lock:
            job = copy.deepcopy(self.world.table(TABLE).get(name))
        if job is None:
            return
        resources = job["dedicatedResources"]
        replicas = resources.get("startingReplicaCount") or resources["maxReplicaCount"]
        self._hold(name, stop, PENDING_KEY)
        began = time.time()

        def update(**fields: Any) -> dict[str, Any]:
            fields["resourcesConsumed"] = {"replicaHours": (time.time() - began) / 3600 * replicas}
            return self._update(name, **fields)

        replica = self.servers.start_for_job(
            _id(name), job["_model"], resources.get("machineSpec", {}), self.world.project_number
        )
        self._wait_ready(name, replica, stop)
        if self._cancelled(name):
            update()
            return self._end(name, "JOB_STATE_CANCELLED", _CANCELLED)
        storage = _storage(self.gcs_url)
        items = [_item(line, job.get("instanceConfig") or {}) for line in _read(storage, job)]
        if not items:
            uris = job["inputConfig"]["gcsSource"]["uris"]
            raise JobError(3, f"The input files hold no instances: {', '.join(uris)}")
        directory = _output_directory(job, storage)
        results: list[dict[str, Any]] = []
        errors = [self._failed(item.ident, *item.error) for item in items if item.error]
        work = [item for item in items if not item.error]
        update(
            state="JOB_STATE_RUNNING",
            startTime=now(),
            outputInfo={"gcsOutputDirectory": directory},
            completionStats=_stats(results, errors, len(items)),
        )
        size = job["manualBatchTuningParameters"]["batchSize"] or 64
        cancelled = False
        for start in range(0, len(work), size):
            self._hold(name, stop)
            if self._cancelled(name):
                cancelled = True
                break
            chunk = work[start : start + size]
            for item, answer in zip(chunk, self._send(replica, chunk, job, stop), strict=True):
                if isinstance(answer, tuple):
                    errors.append(self._failed(item.ident, *answer))
                else:
                    results.append({**item.ident, "prediction": answer})
            update(completionStats=_stats(results, errors, len(items)))
        _write(storage, directory, RESULTS, results)
        _write(storage, directory, ERRORS, errors)
        cancelled = cancelled or self._cancelled(name)
        update(completionStats=_stats(results, errors, len(items)))
        if cancelled:
            return self._end(name, "JOB_STATE_CANCELLED", _CANCELLED)
        if not results:
            first = errors[0]["error"]
            code = first.get("code") or next((n for s, n in GRPC.values() if s == first.get("status")), 2)
            return self._end(name, "JOB_STATE_FAILED", {"code": code, "message": first["message"]})
        return self._end(name, "JOB_STATE_SUCCEEDED", None)

    def _wait_ready(self, name: str, replica: Replica, stop: threading.Event) -> None:
        """Until the replica answers its health route as ready; FAILED if it dies or takes too long."""
        deadline = time.monotonic() + self.world.batch_ready_s
        while True:
            state = replica.state()
            if state == "ready":
                return
            if state == "failed":
                raise JobError(
                    9,
                    f"The model server of the batch prediction job failed to start. Container log: {replica.reason()}",
                )
            if time.monotonic() > deadline:
                raise JobError(
                    4,
                    f"The model server did not become healthy within {self.world.batch_ready_s:g} s "
                    f"(health route {replica.health_route}).",
                )
            if self._cancelled(name):
                return
            if stop.wait(0.1):
                raise Stopped

    def _hold(self, name: str, stop: threading.Event, key: str = SLOW_KEY) -> None:
        """While a test holds batch jobs (world.slow `key`), a job waits (RUNNING: sends nothing)."""
        while True:
            with self.world.lock:
                held = key in self.world.slow
            if not held or self._cancelled(name):
                return
            if stop.wait(0.05):
                raise Stopped

    def _send(self, replica: Replica, chunk: list[Item], job: dict[str, Any], stop: threading.Event) -> list[Any]:
        """One request of `chunk`'s instances: a prediction per instance, or (status, message) for each."""
        payload: dict[str, Any] = {"instances": [item.instance for item in chunk]}
        if self.world.batch_sends_parameters and "modelParameters" in job:
            payload["parameters"] = job["modelParameters"]
        status, message = 503, ""
        for attempt in range(RETRIES + 1):
            if stop.is_set():
                raise Stopped
            try:
                answer = httpx.post(replica.url + replica.predict_route, json=payload, timeout=REQUEST_TIMEOUT_S)
            except httpx.TimeoutException:
                status, message = 504, f"The model server did not answer within {REQUEST_TIMEOUT_S:g} s."
            except httpx.HTTPError as exc:
                status, message = 503, f"The model server is unreachable: {exc}"
            else:
                if answer.is_success:
                    return _predictions(answer, len(chunk))
                status, message = answer.status_code, _message(answer)
            if status not in RETRIED or attempt == RETRIES:
                break
            if stop.wait(min(4.0, 0.2 * 2**attempt)):
                raise Stopped
        return [(status, message)] * len(chunk)

    def _failed(self, ident: dict[str, Any], status: int, message: str) -> dict[str, Any]:
        name, code = GRPC.get(status, ("INTERNAL", 13) if status >= 500 else ("INVALID_ARGUMENT", 3))
        if self.world.batch_error_shape == "status":
            return {**ident, "error": {"status": name, "message": message}}
        return {**ident, "error": {"code": code, "message": message}}

    # ------------------------------------------------------------------ the job record

    def _cancelled(self, name: str) -> bool:
        with self.world.lock:
            job = self.world.table(TABLE).get(name)
            return job is None or job["state"] == "JOB_STATE_CANCELLING"

    def _update(self, name: str, **fields: Any) -> dict[str, Any]:
        with self.world.lock:
            job = self.world.table(TABLE).get(name)
            if job is None:
                raise Stopped
            job.update(fields, updateTime=now())
            return dict(job)

    def _end(self, name: str, state: str, error: dict[str, Any] | None) -> None:
        """The job's final state, once its replica is gone (a client that sees it finished sees no replica)."""
        self.servers.stop(f"batch-{_id(name)}")
        with self.world.lock:
            job = self.world.table(TABLE).get(name)
            if job is None or job["state"] in FINISHED:
                return
            stamp = now()
            job.update(state=state, endTime=stamp, updateTime=stamp)
            if error is not None:
                job["error"] = error


_CANCELLED = {"code": 1, "message": "The batch prediction job was cancelled."}


def _id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _stats(results: list[Any], errors: list[Any], total: int) -> dict[str, str]:
    """completionStats: int64 fields, so strings in JSON."""
    return {
        "successfulCount": str(len(results)),
        "failedCount": str(len(errors)),
        "incompleteCount": str(total - len(results) - len(errors)),
    }


def _item(line: str, config: dict[str, Any]) -> Item:
    """An input line as the model gets it (instanceConfig applied), or its error."""
    try:
        instance = json.loads(line)
    except json.JSONDecodeError as exc:
        return Item({"instance": line}, error=(400, f"The input line is not valid JSON: {exc}"))
    if not isinstance(instance, dict):
        return Item({"instance": instance}, error=(400, "instance_type object needs a JSON object on every line."))
    key_field = config.get("keyField")
    if key_field and key_field not in instance:
        return Item({"instance": instance}, error=(400, f"The instance has no key field {key_field!r}."))
    ident = {"key": instance[key_field]} if key_field else {"instance": instance}
    sent = {k: v for k, v in instance.items() if k != key_field}
    if config.get("includedFields"):
        sent = {k: v for k, v in sent.items() if k in config["includedFields"]}
    sent = {k: v for k, v in sent.items() if k not in config.get("excludedFields", [])}
    return Item(ident, sent)


def _predictions(answer: httpx.Response, count: int) -> list[Any]:
    try:
        predictions = answer.json().get("predictions")
    except (ValueError, AttributeError):
        predictions = None
    if not isinstance(predictions, list) or len(predictions) != count:
        got = len(predictions) if isinstance(predictions, list) else "no"
        return [(500, f"The model server answered {got} predictions for {count} instances.")] * count
    return predictions


def _message(answer: httpx.Response) -> str:
    """The container's own message ({"error": {"message"}} as sdxl_server answers), else its body, one line."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        message = answer.json()["error"]["message"]
        if isinstance(message, str) and message:
            return message
    return " ".join(answer.text[:500].split()) or f"HTTP {answer.status_code}"


# ------------------------------------------------------------------ Cloud Storage


def _storage(gcs_url: str | None) -> Any:
    if not gcs_url:
        raise JobError(9, "This emulator has no Cloud Storage (create_app(gcs_url=...)).")
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="emulator", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_url}
    )


def _read(client: Any, job: dict[str, Any]) -> list[str]:
    """Every non-blank line of the input files, in order (a wildcard's matches sorted by name)."""
    from google.api_core.exceptions import NotFound

    lines: list[str] = []
    for uri in job["inputConfig"]["gcsSource"]["uris"]:
        bucket, _, pattern = uri.removeprefix("gs://").partition("/")
        cut = min((pattern.index(c) for c in "*?[" if c in pattern), default=None)
        try:
            if cut is None:
                names = [pattern]
            else:
                blobs = client.list_blobs(bucket, prefix=pattern[:cut])
                names = sorted(b.name for b in blobs if fnmatch.fnmatchcase(b.name, pattern))
            if not names:
                raise JobError(5, f"No files match {uri}.")
            for object_name in names:
                data = client.bucket(bucket).blob(object_name).download_as_bytes()
                lines += [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
        except NotFound:
            raise JobError(5, f"The input {uri} does not exist.") from None
    return lines


def _output_directory(job: dict[str, Any], client: Any) -> str:
    """<outputUriPrefix>/prediction-<model display name>-<createTime with '-', ':', '.' as '_'> (its bucket exists)."""
    prefix = job["outputConfig"]["gcsDestination"]["outputUriPrefix"]
    bucket = prefix.removeprefix("gs://").split("/", 1)[0]
    if not client.bucket(bucket).exists():
        raise JobError(5, f"The output bucket gs://{bucket} does not exist.")
    created = job["createTime"][:23] + "Z"  # milliseconds, as Google's directory names have them
    stamp = created.replace("-", "_").replace(":", "_").replace(".", "_")
    return f"{prefix.rstrip('/')}/prediction-{job['_model'].get('displayName', '')}-{stamp}"


def _write(client: Any, directory: str, name: str, lines: list[dict[str, Any]]) -> None:
    bucket, _, path = directory.removeprefix("gs://").partition("/")
    data = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
    client.bucket(bucket).blob(f"{path}/{name}").upload_from_string(data, content_type="application/jsonl")
