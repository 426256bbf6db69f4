"""Cloud Run's front end and instances for the emulator's services, on loopback.

Every Cloud Run service the emulator holds gets a listener of its own, `http://127.0.0.1:<port>`, which is
its `uri`. The listener plays Google's front end for that one service (run_frontend.py), in Google's order:
1. the caller: `Authorization: Bearer <ID token>` whose audience is the service's URL (with or without a
   trailing '/', or one of its customAudiences): 401 without one, or for a bad, expired or foreign token;
2. invoke permission: roles/run.invoker (or run.admin) on the service for `serviceAccount:`/`user:` the
   token's email, `allUsers`, `allAuthenticatedUsers`, invokerIamDisabled, or a project owner
   (`world.owners`, the deployer): 403 otherwise;
3. capacity: more requests in flight than maxInstanceRequestConcurrency x maxInstanceCount: 429;
4. an instance: started if none runs, then the request is passed on; past template.timeout: 504.

Scale to zero, emulated: an instance is a local process that runs the image's command from this checkout
(`python -m sdxl_ui` for a repository named "*-ui", else `python -m sdxl_server`) with the container's env,
PORT, K_SERVICE/K_REVISION/K_CONFIGURATION and the emulator's metadata server for the service's account.
No instance runs until a request comes (minInstanceCount 0): the first request after idle starts the
process and waits for its startup probe (httpGet or TCP, every periodSeconds x `world.run_probe_scale`,
failureThreshold tries); a container that exits or never passes gives 503, and the next request tries a new
one, as Cloud Run does. An instance with no request for `world.run_idle_s` seconds (Cloud Run keeps an idle
instance up to 15 minutes: default 900) is stopped; minInstanceCount > 0 starts one when the revision is
ready and keeps it. A new revision stops the old one's instance. With ModelServers(forward_to=URL) a
"-server" service's instance is that running server (no process), still started, counted and stopped.
Deviations, for a machine without containers: at most one instance per service; the process listens on a
free loopback port, not 8080; minInstanceCount 0 starts nothing at deploy (Cloud Run starts one to check the
revision), so a broken container shows at the first request.

Cloud Monitoring's timeSeries read answers run.googleapis.com/container/instance_count (running now) and
billable_instance_time (seconds an instance was up within the interval) from these instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute

from tests.emulator.core import World
from tests.emulator.model_servers import ModelServers, start_process, stop_process
from tests.emulator.run_frontend import Frontend, Instance, forward, page, refusal, unavailable


class RunInstances:
    """The listeners and instances of every Cloud Run service in `world` (see the module docstring)."""

    def __init__(self, world: World, servers: ModelServers, log_dir: Path | None = None) -> None:
        self.world = world
        self.servers = servers
        self.log_dir = log_dir or servers.log_dir or Path(tempfile.mkdtemp(prefix="run-emulator-"))
        self.emulator_url = ""  # the emulator's own URL, for the instances' metadata server
        self.frontends: dict[str, Frontend] = {}
        self.lives: dict[str, list[list[float | None]]] = {}  # service name -> [started, stopped] per instance
        self._guard = threading.RLock()
        self._reaper: tuple[threading.Thread, threading.Event] | None = None

    # ------------------------------------------------------------------ the emulator's side

    def ready(self, service: dict[str, Any]) -> str:
        """A revision of `service` became ready: its listener (made once, kept across revisions) and URL.

        The previous revision's instance stops; minInstanceCount > 0 starts one now (in the background)."""
        name = service["name"]
        with self._guard:
            frontend = self.frontends.get(name) or self._listen(name)
            old = frontend.instance
        revision = _revision(service)
        if old is not None and old.revision != revision:
            self._retire(frontend)
        if _min_instances(service) > 0:
            threading.Thread(target=self._warm, args=(frontend, service), daemon=True).start()
        self._start_reaper()
        return frontend.url

    def remove(self, name: str) -> None:
        """The service is deleted: its instance and listener stop (without waiting: the caller holds the world)."""
        with self._guard:
            frontend = self.frontends.pop(name, None)
        if frontend is not None:
            threading.Thread(target=self._shut, args=(frontend,), daemon=True).start()

    def stop_all(self) -> None:
        """Every instance and listener stops (the emulator's shutdown, or a reset), and the reaper with them."""
        with self._guard:
            frontends = list(self.frontends.values())
            self.frontends.clear()
            reaper, self._reaper = self._reaper, None
        for frontend in frontends:
            frontend.closed.set()  # starts in progress give up at their next probe
        if reaper is not None:
            reaper[1].set()
            reaper[0].join(timeout=30)
        for frontend in frontends:
            self._shut(frontend)
        self.lives.clear()

    def find(self, service_id: str) -> Frontend | None:
        """The front end of a service by its id (the name's last segment) or full name."""
        with self._guard:
            for name, frontend in self.frontends.items():
                if name == service_id or name.rsplit("/", 1)[-1] == service_id:
                    return frontend
        return None

    def count(self, name: str) -> int:
        """Instances of service `name` running now."""
        frontend = self.frontends.get(name)
        return int(frontend is not None and frontend.instance is not None)

    def scale_to_zero(self, frontend: Frontend) -> None:
        """An idle instance stops now, as after run_idle_s (not one serving a request, nor one min instances keep)."""
        with self.world.lock:
            service = self.world.table("services").get(frontend.name)
        if service is None or _min_instances(service) == 0:
            with frontend.lock:  # a request counts itself in before it asks for the instance, under this lock
                if frontend.in_flight == 0:
                    self._retire(frontend)

    def billable_seconds(self, name: str, start: float, end: float) -> float:
        """Seconds instances of `name` were up within [start, end] (epoch seconds)."""
        now = time.time()
        total = 0.0
        for began, stopped in self.lives.get(name, []):
            assert began is not None
            total += max(0.0, min(end, stopped if stopped is not None else now) - max(start, began))
        return total

    # ------------------------------------------------------------------ listeners

    def _listen(self, name: str) -> Frontend:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = Starlette(routes=[StarletteRoute("/{path:path}", self._handler(name), methods=_METHODS)])
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"run-frontend-{name.rsplit('/', 1)[-1]}", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        frontend = Frontend(name, url, server, thread)
        self.frontends[name] = frontend
        return frontend

    def _shut(self, frontend: Frontend) -> None:
        frontend.closed.set()
        with frontend.lock:  # a start in progress sees `closed` at its next probe and stops what it started
            self._retire(frontend)
        frontend.server.should_exit = True
        frontend.thread.join(timeout=10)

    def _handler(self, name: str) -> Any:
        async def handle(request: Request) -> Response:
            frontend = self.frontends.get(name)
            with self.world.lock:
                service = self.world.table("services").get(name)
                policy = self.world.get_policy("service-policies", name) if service else {}
            if frontend is None or service is None:
                return page(
                    404, "Not Found", f"The requested URL <code>{request.url.path}</code> was not found on this server."
                )
            refused = refusal(self.world, request, service, policy, frontend.url)
            if refused is not None:
                return refused
            template = service.get("template", {})
            cap = (template.get("maxInstanceRequestConcurrency") or 80) * _max_instances(service)
            if frontend.in_flight >= cap:
                return Response("Rate exceeded.", status_code=429, media_type="text/plain")
            try:
                # Read before a cold start: a caller that gives up meanwhile (sdxlctl's first health poll waits
                # 3 s) would leave nothing to read after it, and Starlette's ClientDisconnect went to stderr.
                body = await request.body()
            except ClientDisconnect:
                return Response(status_code=499)  # nobody reads it
            frontend.in_flight += 1
            try:
                instance = await asyncio.to_thread(self._instance, frontend, service)
                if instance is None:
                    frontend.in_flight -= 1
                    return unavailable()
                return await forward(request, body, frontend, instance, _seconds(template.get("timeout", "300s")))
            except BaseException:
                frontend.in_flight -= 1
                raise

        return handle

    def _instance(self, frontend: Frontend, service: dict[str, Any]) -> Instance | None:
        """The running instance, or a new one once its startup probe passes; None when it fails to start.

        Two first requests at once start one (the second waits on the lock). A start that a new revision
        overtook serves the request that started it; the next one retires it and starts the new revision's.
        A service deleted (or an emulator stopped) during a start keeps nothing of it."""
        with frontend.lock:
            if frontend.closed.is_set():
                return None
            running = frontend.instance
            if running is not None and running.revision == _revision(service):
                return running
            if running is not None:
                self._retire(frontend)
            instance = self._start(frontend, service)
            if not self._probe(instance, service, frontend) or frontend.closed.is_set():
                self._kill(instance)
                return None
            instance.last_used = time.monotonic()
            frontend.instance = instance
            return instance

    def _warm(self, frontend: Frontend, service: dict[str, Any]) -> None:
        """minInstanceCount > 0: an instance starts when the revision is ready, and stays."""
        self._instance(frontend, service)

    def _start(self, frontend: Frontend, service: dict[str, Any]) -> Instance:
        from tests.emulator import identity

        container = (service.get("template", {}).get("containers") or [{}])[0]
        image = container.get("image", "")
        revision = _revision(service)
        service_id = frontend.name.rsplit("/", 1)[-1]
        life: list[float | None] = [time.time(), None]
        self.lives.setdefault(frontend.name, []).append(life)
        frontend.starts += 1
        ui = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0].endswith("-ui")
        if self.servers.forward_to and not ui:
            return Instance(self.servers.forward_to, revision, None, None, life)
        port = _free_port()
        metadata = identity.metadata_host(self.emulator_url, frontend.name)
        # An instance has no key file (its identity is the metadata server's) and none of Vertex AI's variables
        env = {
            k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS" and not k.startswith("AIP_")
        }
        env.update({var["name"]: var.get("value", "") for var in container.get("env", [])})
        env.update(
            {
                "PORT": str(port),
                "K_SERVICE": service_id,
                "K_REVISION": revision,
                "K_CONFIGURATION": service_id,
                "GCE_METADATA_HOST": metadata,
                "GCE_METADATA_IP": metadata,
                "HF_HUB_OFFLINE": "1",
                "GRADIO_ANALYTICS_ENABLED": "False",
                "SDXL_HOST": "127.0.0.1",
                "SDXL_UI_HOST": "127.0.0.1",
            }
        )
        log_path = self.log_dir / f"run-{service_id}-{frontend.starts}.log"
        process = start_process([sys.executable, "-m", "sdxl_ui" if ui else "sdxl_server"], env, log_path)
        return Instance(f"http://127.0.0.1:{port}", revision, process, log_path, life)

    def _probe(self, instance: Instance, service: dict[str, Any], frontend: Frontend) -> bool:
        """The container's startup probe, its periods x world.run_probe_scale. Without one, Cloud Run's default:
        TCP on the port, which waits up to 240 s for it (not scaled: an instance without a probe, the UI's, would
        get 2.4 s to start at a scale of 0.01; a container that exits is seen at once all the same)."""
        container = (service.get("template", {}).get("containers") or [{}])[0]
        probe = container.get("startupProbe")
        scale = self.world.run_probe_scale
        if not probe:
            probe, scale = {"tcpSocket": {}, "periodSeconds": 0.1, "failureThreshold": 2400}, 1.0
        period = float(probe.get("periodSeconds") or 10) * scale
        timeout = float(probe.get("timeoutSeconds") or 1)
        if frontend.closed.wait(float(probe.get("initialDelaySeconds") or 0) * scale):
            return False
        for _ in range(int(probe.get("failureThreshold") or 3)):
            if frontend.closed.is_set() or (instance.process is not None and instance.process.poll() is not None):
                return False
            if _passes(instance.url, probe, timeout):
                return True
            if frontend.closed.wait(period):
                return False
        return False

    def _retire(self, frontend: Frontend) -> None:
        instance, frontend.instance = frontend.instance, None
        if instance is not None:
            self._kill(instance)

    def _kill(self, instance: Instance) -> None:
        if instance.life[1] is None:
            instance.life[1] = time.time()
        if instance.process is not None:
            stop_process(instance.process)

    def _start_reaper(self) -> None:
        with self._guard:
            if self._reaper is None or not self._reaper[0].is_alive():
                stop = threading.Event()
                thread = threading.Thread(target=self._reap, args=(stop,), name="run-reaper", daemon=True)
                self._reaper = (thread, stop)
                thread.start()

    def _reap(self, stop: threading.Event) -> None:
        """Idle instances of services at minInstanceCount 0 stop after `world.run_idle_s`."""
        while not stop.wait(0.1):
            idle_s = self.world.run_idle_s
            with self._guard:
                frontends = list(self.frontends.values())
            for frontend in frontends:
                instance = frontend.instance
                if instance is None or frontend.in_flight or time.monotonic() - instance.last_used < idle_s:
                    continue
                with self.world.lock:
                    service = self.world.table("services").get(frontend.name)
                if service is not None and _min_instances(service) > 0:
                    continue
                if frontend.lock.acquire(blocking=False):
                    try:
                        if frontend.in_flight == 0:
                            self._retire(frontend)
                    finally:
                        frontend.lock.release()


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def _passes(url: str, probe: dict[str, Any], timeout: float) -> bool:
    if "httpGet" in probe:
        try:
            answer = httpx.get(url + (probe["httpGet"].get("path") or "/"), timeout=timeout)
        except httpx.HTTPError:
            return False
        return 200 <= answer.status_code < 400
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=timeout):
        return True
    return False


def _revision(service: dict[str, Any]) -> str:
    return str(service.get("latestReadyRevision", "")).rsplit("/", 1)[-1]


def _min_instances(service: dict[str, Any]) -> int:
    return max(
        int(service.get("template", {}).get("scaling", {}).get("minInstanceCount", 0) or 0),
        int(service.get("scaling", {}).get("minInstanceCount", 0) or 0),
    )


def _max_instances(service: dict[str, Any]) -> int:
    return int(service.get("template", {}).get("scaling", {}).get("maxInstanceCount", 0) or 100)


def _seconds(duration: str) -> float:
    """A google.protobuf.Duration in JSON ('600s', '1.5s')."""
    return float(str(duration).rstrip("s") or 300)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
