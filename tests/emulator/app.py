"""The emulator's ASGI app: every route of every emulated service, plus /_emulator/ controls for tests."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from tests.emulator.batch import BatchJobs
from tests.emulator.billing import Billing
from tests.emulator.cloudbuild import CloudBuild
from tests.emulator.cloudrun import CloudRun
from tests.emulator.core import ANSWERS, ApiError, Fault, Recorded, Route, World, read_json
from tests.emulator.iam_roles import IamRoles
from tests.emulator.identity import Identity
from tests.emulator.logging import Logging
from tests.emulator.model_servers import ModelServers
from tests.emulator.project import Project
from tests.emulator.registry import Registry
from tests.emulator.run_instances import RunInstances
from tests.emulator.run_monitoring import Monitoring
from tests.emulator.vertex import Vertex


class Storage:
    """Objects in the GCS emulator, through the real google-cloud-storage client (anonymous)."""

    def __init__(self, url: str | None) -> None:
        self.url = url

    def _client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="emulator", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.url}
        )

    def read(self, bucket: str, name: str) -> bytes | None:
        if not self.url:
            return None
        from google.api_core.exceptions import NotFound

        try:
            return bytes(self._client().bucket(bucket).blob(name).download_as_bytes())
        except NotFound:
            return None

    def write(self, bucket: str, name: str, data: bytes) -> None:
        if not self.url:
            return
        from google.api_core.exceptions import Conflict

        client = self._client()
        with contextlib.suppress(Conflict):
            client.create_bucket(bucket)
        client.bucket(bucket).blob(name).upload_from_string(data)


def create_app(
    world: World | None = None, *, servers: ModelServers | None = None, gcs_url: str | None = None
) -> Starlette:
    """The emulator: Vertex AI, Cloud Build, Cloud Run, IAM and Cloud Logging on one port, as Google answers."""
    world = world or World()
    servers = servers or ModelServers()
    storage = Storage(gcs_url)
    instances = RunInstances(world, servers)
    batch = BatchJobs(world, servers, gcs_url)
    routes: list[Route] = [
        *Vertex(world, servers).routes(),
        *batch.routes(),
        *CloudBuild(world, storage.read, storage.write).routes(),
        *CloudRun(world, instances).routes(),
        *Monitoring(world, instances).routes(),
        *Billing(world).routes(),
        *Registry(world).routes(),
        *IamRoles(world).routes(),
        *Project(world).routes(),
        *Logging(world, servers).routes(),
        *Identity(world).routes(),
    ]

    async def dispatch(request: Request) -> Response:
        path = request.url.path
        body: Any = None
        recorded = Recorded(request.method, path, dict(request.query_params), None)
        if gcs_url and path.startswith(GCS_PATHS):
            return await _to_gcs(request, gcs_url, world, recorded)
        try:
            body = await read_json(request)
            recorded.body = body
            if world.detached:  # a deploy's progress asks its model server: not on the event loop
                await asyncio.to_thread(_locked, world, world.tick)
            with world.lock:
                world.requests.append(recorded)
                fault = world.take_fault(request.method, path, operation=False)
                started = set(world.operations)
            if fault is not None and not fault.after:
                return _faulty(request, fault, recorded)
            handler, params = _match(routes, request.method, path)
            if inspect.iscoroutinefunction(handler):
                result = await handler(request, params, body)
            else:
                # Handlers may start processes or talk to GCS: keep the event loop free for other clients.
                result = await asyncio.to_thread(_locked, world, handler, request, params, body)
            if fault is not None:  # it happened; only the answer is lost, and its operation runs on
                with world.lock:
                    world.detached |= set(world.operations) - started
                return _faulty(request, fault, recorded)
            response = result if isinstance(result, Response) else JSONResponse(result)
            recorded.status = response.status_code  # a handler's own Response may be an error (OAuth's 400)
            return response
        except ApiError as exc:
            recorded.status = exc.code
            return JSONResponse(exc.body(), status_code=exc.code)

    async def requests(request: Request) -> Response:
        with world.lock:
            return JSONResponse([vars(r) for r in world.requests])

    async def resources(request: Request) -> Response:
        with world.lock:
            data = {
                kind: [{k: v for k, v in r.items() if not k.startswith("_")} for r in table.values()]
                for kind, table in world.resources.items()
            }
        return Response(json.dumps(data), media_type="application/json")

    async def faults(request: Request) -> Response:
        spec = json.loads(await request.body())
        error = ApiError(spec.get("code", 503), spec.get("message", "injected fault"), spec.get("status"))
        answer = spec.get("answer", "error")
        if answer not in ANSWERS:
            return JSONResponse({"error": f"answer must be one of {ANSWERS}"}, status_code=400)
        fault = Fault(
            spec.get("method", "*"),
            spec["path"],
            error,
            spec.get("times", 1),
            spec.get("operation", False),
            answer,
            spec.get("after", False),
        )
        with world.lock:
            world.faults.append(fault)
        return JSONResponse({"ok": True})

    async def clear_faults(request: Request) -> Response:
        """The faults not yet used up are dropped: a storm ends."""
        with world.lock:
            left = sum(fault.times for fault in world.faults)
            world.faults.clear()
        return JSONResponse({"cleared": left})

    async def run_instances(request: Request) -> Response:
        """How many instances a Cloud Run service runs now, and how many it has started."""
        frontend = instances.find(request.path_params["service"])
        if frontend is None:
            return JSONResponse({"error": "no such Cloud Run service"}, status_code=404)
        return JSONResponse({"running": instances.count(frontend.name), "started": frontend.starts})

    async def scale_to_zero(request: Request) -> Response:
        """The service's idle instance stops now, as after run_idle_s."""
        frontend = instances.find(request.path_params["service"])
        if frontend is None:
            return JSONResponse({"error": "no such Cloud Run service"}, status_code=404)
        await asyncio.to_thread(instances.scale_to_zero, frontend)
        return JSONResponse({"running": instances.count(frontend.name)})

    async def reset(request: Request) -> Response:
        await asyncio.to_thread(batch.stop_all)
        servers.stop_all()
        await asyncio.to_thread(instances.stop_all)
        with world.lock:
            world.resources.clear()
            world.operations.clear()
            world.faults.clear()
            world.requests.clear()
            world.detached.clear()
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            StarletteRoute("/_emulator/requests", requests, methods=["GET"]),
            StarletteRoute("/_emulator/resources", resources, methods=["GET"]),
            StarletteRoute("/_emulator/faults", faults, methods=["POST"]),
            StarletteRoute("/_emulator/faults", clear_faults, methods=["DELETE"]),
            StarletteRoute("/_emulator/reset", reset, methods=["POST"]),
            StarletteRoute("/_emulator/run/{service}", run_instances, methods=["GET"]),
            StarletteRoute("/_emulator/run/{service}/scale-to-zero", scale_to_zero, methods=["POST"]),
            StarletteRoute("/{path:path}", dispatch, methods=["GET", "POST", "PATCH", "DELETE", "PUT"]),
        ],
        lifespan=_stopping(servers, instances, batch),
    )
    app.state.world = world
    app.state.servers = servers
    app.state.instances = instances
    app.state.batch = batch
    return app


def _stopping(servers: ModelServers, instances: RunInstances, batch: BatchJobs) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(batch.stop_all)  # before the servers: a job's worker stops its own replica
        servers.stop_all()  # no model server, Cloud Run listener or instance outlives the emulator
        await asyncio.to_thread(instances.stop_all)

    return lifespan


# Cloud Storage's JSON API, upload and download paths: with STORAGE_EMULATOR_HOST set to this emulator,
# they reach the GCS emulator through here, where faults apply to them as to every other API.
GCS_PATHS = ("/storage/v1/", "/upload/storage/v1/", "/download/storage/v1/")


async def _to_gcs(request: Request, gcs_url: str, world: World, recorded: Recorded) -> Response:
    """Forward a Cloud Storage request as it came (bytes, not JSON: uploads are multipart)."""
    import httpx

    with world.lock:
        world.requests.append(recorded)
        fault = world.take_fault(request.method, request.url.path, operation=False)
    if fault is not None and not fault.after:
        return _faulty(request, fault, recorded)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.request(
            request.method,
            gcs_url + request.url.path,
            params=request.url.query,
            headers=headers,
            content=await request.body(),
        )
    if fault is not None:
        return _faulty(request, fault, recorded)
    recorded.status = answer.status_code
    kept = {k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "etag", "location")}
    return Response(answer.content, status_code=answer.status_code, headers=kept)


def _faulty(request: Request, fault: Fault, recorded: Recorded) -> Response:
    """The answer a fault gives instead of the real one."""
    if fault.answer == "drop":
        # uvicorn's receive is a method of the request's cycle, which holds the connection: closing it
        # leaves the client with no status line at all (the Response returned below is never written).
        transport = getattr(getattr(request.receive, "__self__", None), "transport", None)
        if transport is None:
            raise RuntimeError("dropping a connection needs the emulator to run under uvicorn")
        transport.abort()
        recorded.status = 0
        return Response(status_code=500)
    if fault.answer == "garbled":
        recorded.status = 200
        return Response(b'{"name": "projects/', media_type="application/json")  # cut short
    recorded.status = fault.error.code
    return JSONResponse(fault.error.body(), status_code=fault.error.code)


def _locked(world: World, handler: Any, *args: Any) -> Any:
    with world.lock:
        return handler(*args)


def _match(routes: list[Route], method: str, path: str) -> tuple[Any, dict[str, str]]:
    allowed = False
    for route in routes:
        match = route.pattern.match(path)
        if match:
            if route.method == method:
                return route.handler, {k: v for k, v in match.groupdict().items() if v is not None}
            allowed = True
    if allowed:
        raise ApiError(405, f"Method {method} is not allowed on {path}.", "METHOD_NOT_ALLOWED")
    raise ApiError(404, f"The requested URL {path} was not found on this server.")
