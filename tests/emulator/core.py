"""The emulator's machinery: Google-style routes, errors, long-running operations, faults, request log.

Request bodies are parsed into the client libraries' own protobuf types, so an unknown field, a wrong
type or a bad enum value is refused with 400 INVALID_ARGUMENT as Google's front end refuses it.
Answers are built the same way (camelCase JSON of real messages, `Any` with its type URL).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

# The account tests deploy as (tests/emulator_fixtures.py gives sdxlctl its key file): a project owner
DEPLOYER = "deployer@demo-project.iam.gserviceaccount.com"

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# google.rpc.Code numbers, for errors inside operations
RPC_CODES = {
    "INVALID_ARGUMENT": 3,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
}


class ApiError(Exception):
    """Answered as {"error": {"code", "message", "status"}}; `status` overrides the one the code implies."""

    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status or STATUS_NAMES.get(code, "UNKNOWN")

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


def now() -> str:
    """RFC 3339 time as Google writes it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(message_type: Any, data: Any, where: str) -> dict[str, Any]:
    """Check `data` against a proto message type; return it normalised (camelCase, enum names)."""
    message = message_type.pb()() if hasattr(message_type, "pb") else message_type()
    try:
        json_format.ParseDict(data if data is not None else {}, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise ApiError(400, f"Invalid JSON payload received at {where}. {exc}") from None
    return json_format.MessageToDict(message)


def packed(message_type: Any, data: dict[str, Any]) -> dict[str, Any]:
    """`data` as a google.protobuf.Any of `message_type` (validated on the way out too)."""
    descriptor = (message_type.pb() if hasattr(message_type, "pb") else message_type).DESCRIPTOR
    return {"@type": f"type.googleapis.com/{descriptor.full_name}", **parse(message_type, data, "response")}


@dataclass
class Operation:
    """A long-running operation that reports done after `polls_left` reads (and `ready()`)."""

    name: str
    metadata: dict[str, Any]
    polls_left: int
    finish: Callable[[], dict[str, Any]]  # called once when done: returns the packed response, or raises ApiError
    ready: Callable[[], bool] = lambda: True
    done: bool = False
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def poll(self) -> dict[str, Any]:
        """The operation as GetOperation returns it, advancing it by one poll."""
        if not self.done:
            self.polls_left -= 1
            if self.polls_left <= 0 and self.ready():
                self.done = True
                try:
                    self.response = self.finish()
                except ApiError as exc:
                    self.error = {"code": RPC_CODES.get(exc.status, 2), "message": exc.message}
        return self.json()

    def json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "metadata": self.metadata, "done": self.done}
        if self.error is not None:
            body["error"] = self.error
        elif self.response is not None:
            body["response"] = self.response
        return body


ANSWERS = ("error", "drop", "garbled")


@dataclass
class Fault:
    """An injected failure: the next `times` requests matching `method` and `path` get `error`.

    `operation`: instead of failing the request, the operation it starts fails with `error`.
    `answer`: what the client gets instead of the real answer: `error`, `drop` (the connection is closed
    with no answer at all) or `garbled` (200 with a body cut short, not JSON).
    `after`: the request takes effect first (the resource is made, the operation runs on by itself, as
    Google's would), and only its answer is lost: what a client sees when a create "fails" but happened.
    """

    method: str
    path: str  # a regular expression searched in the path
    error: ApiError
    times: int = 1
    operation: bool = False
    answer: str = "error"
    after: bool = False


@dataclass
class Recorded:
    """One request as the emulator received it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int = 0


Handler = Callable[[Request, dict[str, str], Any], Awaitable[Any] | Any]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler


@dataclass
class World:
    """Everything the emulated services hold; one lock keeps request handling consistent."""

    polls_to_finish: int = 2
    # Cloud Run instances (run_instances.py): idle seconds before one stops, and the startup probe's
    # periodSeconds multiplied by this (tests make a 10 s period a fraction of a second)
    run_idle_s: float = 900.0
    run_probe_scale: float = 1.0
    project_number: str = "123456789012"
    lock: threading.RLock = field(default_factory=threading.RLock)
    resources: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # kind -> name -> JSON
    operations: dict[str, Operation] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    # Operations whose start was answered with a fault: no client polls them, so each request advances them
    detached: set[str] = field(default_factory=set)
    # Operations whose metadata type contains a key take that many polls (a slow step to interrupt)
    slow: dict[str, int] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(int(time.time()) * 1000))
    # Project owners: Cloud Run lets them invoke any service of the project without a binding of their own
    owners: set[str] = field(default_factory=lambda: {DEPLOYER})
    # Vertex AI batch prediction (batch_runner.py), where Google's behaviour is unconfirmed: whether the job's
    # modelParameters reach the container as the body's "parameters", and which error shape an output line has
    # ("code": google.rpc.Status, or "status": the enum name, as PredictionResult.Error); and how long a job's
    # replica may take to become healthy before the job fails
    batch_sends_parameters: bool = True
    batch_error_shape: str = "code"
    batch_ready_s: float = 600.0

    def new_id(self) -> str:
        return str(next(self.ids))

    def table(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.resources.setdefault(kind, {})

    def get(self, kind: str, name: str, what: str) -> dict[str, Any]:
        try:
            return self.table(kind)[name]
        except KeyError:
            raise ApiError(404, f"{what} {name} not found.") from None

    def start_operation(
        self,
        name: str,
        metadata: dict[str, Any],
        finish: Callable[[], dict[str, Any]],
        ready: Callable[[], bool] = lambda: True,
        fault: Fault | None = None,
    ) -> dict[str, Any]:
        """Register an operation and return its first JSON; a matching operation fault makes it fail."""
        if fault is not None:
            error = fault.error

            def failing() -> dict[str, Any]:
                raise error

            finish = failing
        kind = str(metadata.get("@type", ""))
        polls = next((n for key, n in self.slow.items() if key in kind), self.polls_to_finish)
        operation = Operation(name, metadata, polls, finish, ready)
        self.operations[name] = operation
        return operation.json()

    def poll(self, name: str) -> dict[str, Any]:
        """GetOperation: the operation advanced by one poll, or 404."""
        operation = self.operations.get(name)
        if operation is None:
            raise ApiError(404, f"Operation {name} not found.")
        return operation.poll()

    def list_operations(self, resource: str) -> list[dict[str, Any]]:
        """ListOperations of a resource: the operations started on it (done ones too), as Google lists them."""
        prefix = f"{resource}/operations/"
        return [op.json() for name, op in self.operations.items() if name.startswith(prefix)]

    def hurry(self) -> None:
        """Time passes: slow operations are slow no more, and each running one ends at its next poll."""
        self.slow.clear()
        for operation in self.operations.values():
            operation.polls_left = min(operation.polls_left, 1)

    def tick(self) -> None:
        """Advance every detached operation by one poll: the server goes on with them though nobody asks."""
        for name in list(self.detached):
            operation = self.operations.get(name)
            if operation is None or operation.poll()["done"]:
                self.detached.discard(name)

    def get_policy(self, table: str, resource: str) -> dict[str, Any]:
        """GetIamPolicy of `resource` (an empty policy until one is set)."""
        return self.table(table).get(resource, {"etag": "ACAB"})

    def set_policy(self, table: str, resource: str, body: Any) -> dict[str, Any]:
        """SetIamPolicy: the request checked against google.iam.v1, the policy stored with a new etag."""
        from google.iam.v1 import iam_policy_pb2, policy_pb2

        parsed = parse(
            iam_policy_pb2.SetIamPolicyRequest, {"resource": resource, **(body or {})}, "SetIamPolicyRequest"
        )
        policy = parse(policy_pb2.Policy, parsed.get("policy", {}), "Policy")
        policy["etag"] = "BwY" + self.new_id()
        self.table(table)[resource] = policy
        return policy

    def take_fault(self, method: str, path: str, *, operation: bool) -> Fault | None:
        for fault in self.faults:
            if fault.operation == operation and fault.method in ("*", method) and re.search(fault.path, path):
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None


def routes(table: Sequence[tuple[str, str, Handler]]) -> list[Route]:
    """(method, path regex, handler) rows as Routes; each regex matches the whole path."""
    return [Route(method, re.compile(f"^{pattern}$"), handler) for method, pattern, handler in table]


def label_filter(expression: str) -> Callable[[dict[str, Any]], bool]:
    """The subset of AIP-160 filters sdxlctl and gcloud use: `labels.KEY=VALUE` terms joined by AND."""
    terms = [t.strip() for t in re.split(r"\s+AND\s+", expression.strip()) if t.strip()]
    checks = []
    for term in terms:
        match = re.fullmatch(r'labels\.([\w-]+)\s*[=:]\s*"?([\w.-]*)"?', term)
        if not match:
            raise ApiError(400, f"Unsupported filter: {term!r}")
        key, value = match.groups()
        checks.append((key, value))
    return lambda resource: all(resource.get("labels", {}).get(k) == v for k, v in checks)


def json_response(body: Any, status: int = 200) -> Response:
    return JSONResponse(body, status_code=status)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return None
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return dict(urllib.parse.parse_qsl(raw.decode("utf-8", "replace")))  # OAuth's token endpoint takes a form
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"Invalid JSON payload received. {exc}") from None
