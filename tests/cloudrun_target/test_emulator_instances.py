"""The emulator's Cloud Run front end and instances (tests/emulator/run_instances.py), through google-cloud-run.

Services are created with the real client library; their URL is a loopback listener that checks the caller's
ID token and invoke permission as Google's front end does, and starts an instance on the first request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.emulator.app import create_app
from tests.emulator.core import DEPLOYER, World
from tests.emulator.identity import issue
from tests.emulator.model_servers import ModelServers
from tests.emulator_fixtures import PROJECT, REGION, Emulator
from tests.servers import serve_app

PARENT = f"projects/{PROJECT}/locations/{REGION}"
SERVER_IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/sdxlctl/sdxl-server:v1"
CALLER = f"caller@{PROJECT}.iam.gserviceaccount.com"


def client(url: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import run_v2

    return run_v2.ServicesClient(
        credentials=AnonymousCredentials(), transport="rest", client_options={"api_endpoint": url}
    )


def create(
    emulator: Emulator,
    service_id: str = "sdxl-server",
    *,
    min_instances: int = 0,
    concurrency: int = 4,
    timeout_s: int = 600,
    env: dict[str, str] | None = None,
) -> Any:
    """A CPU service of the model server's image (the GPU fields are run_gpu.py's tests'), ready."""
    from google.cloud import run_v2

    container = run_v2.Container(
        image=SERVER_IMAGE,
        env=[run_v2.EnvVar(name=k, value=v) for k, v in (env or {}).items()],
        ports=[run_v2.ContainerPort(name="http1", container_port=8080)],
        startup_probe=run_v2.Probe(
            http_get=run_v2.HTTPGetAction(path="/health", port=8080), period_seconds=10, failure_threshold=60
        ),
    )
    template = run_v2.RevisionTemplate(
        scaling=run_v2.RevisionScaling(min_instance_count=min_instances, max_instance_count=1),
        max_instance_request_concurrency=concurrency,
        timeout=f"{timeout_s}s",
        containers=[container],
    )
    service = run_v2.Service(template=template, invoker_iam_disabled=False)
    return client(emulator.url).create_service(parent=PARENT, service=service, service_id=service_id).result(30)


def grant(emulator: Emulator, service: Any, member: str) -> None:
    from google.iam.v1 import iam_policy_pb2, policy_pb2

    policy = policy_pb2.Policy(bindings=[policy_pb2.Binding(role="roles/run.invoker", members=[member])])
    client(emulator.url).set_iam_policy(iam_policy_pb2.SetIamPolicyRequest(resource=service.name, policy=policy))


def call(emulator: Emulator, service: Any, email: str = DEPLOYER, path: str = "/health", **kw: Any) -> httpx.Response:
    token = issue(emulator.world, email, service.uri)
    return httpx.get(service.uri + path, headers={"Authorization": f"Bearer {token}"}, timeout=60, **kw)


def until(check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.05)


@pytest.fixture
def fast(emulator: Emulator) -> Emulator:
    """Instances never go idle by themselves unless a test says so; probes every 0.1 s."""
    emulator.world.run_idle_s = 3600
    emulator.world.run_probe_scale = 0.01
    return emulator


def test_the_service_url_is_its_own_listener_that_checks_token_and_invoker(fast: Emulator) -> None:
    service = create(fast)
    assert service.uri.startswith("http://127.0.0.1:") and service.urls == [service.uri]

    bare = httpx.get(service.uri + "/health")
    assert bare.status_code == 401 and "Unauthorized" in bare.text
    other_audience = issue(fast.world, DEPLOYER, "http://127.0.0.1:1")
    wrong = httpx.get(service.uri + "/health", headers={"Authorization": f"Bearer {other_audience}"})
    assert wrong.status_code == 401
    expired = issue(fast.world, DEPLOYER, service.uri, lifetime_s=-60)
    assert httpx.get(service.uri + "/health", headers={"Authorization": f"Bearer {expired}"}).status_code == 401
    assert httpx.get(service.uri + "/health", headers={"Authorization": "Bearer not-a-jwt"}).status_code == 401
    assert fast.instances("sdxl-server") == 0  # nobody got through: nothing started

    refused = call(fast, service, CALLER)
    assert refused.status_code == 403 and "does not have permission to get URL <code>/health</code>" in refused.text
    grant(fast, service, f"serviceAccount:{CALLER}")
    assert call(fast, service, CALLER).status_code == 200
    assert call(fast, service, DEPLOYER).status_code == 200  # a project owner needs no binding
    assert call(fast, service, f"else@{PROJECT}.iam.gserviceaccount.com").status_code == 403


def test_all_users_and_a_disabled_invoker_check_let_anyone_in(fast: Emulator) -> None:
    service = create(fast)
    grant(fast, service, "allUsers")
    assert httpx.get(service.uri + "/health", timeout=30).status_code == 200
    grant(fast, service, "allAuthenticatedUsers")
    assert httpx.get(service.uri + "/health", timeout=30).status_code == 401
    assert call(fast, service, CALLER).status_code == 200


def test_first_request_after_scale_to_zero_starts_an_instance_and_idle_stops_it(fast: Emulator) -> None:
    service = create(fast)
    assert (fast.instances("sdxl-server"), fast.instance_starts("sdxl-server")) == (0, 0)  # min 0: none at deploy
    assert call(fast, service).status_code == 200
    assert (fast.instances("sdxl-server"), fast.instance_starts("sdxl-server")) == (1, 1)
    assert call(fast, service).status_code == 200
    assert fast.instance_starts("sdxl-server") == 1  # a warm instance serves the next request

    fast.scale_to_zero("sdxl-server")
    assert fast.instances("sdxl-server") == 0
    assert call(fast, service).status_code == 200
    assert (fast.instances("sdxl-server"), fast.instance_starts("sdxl-server")) == (1, 2)

    fast.world.run_idle_s = 0.2
    until(lambda: fast.instances("sdxl-server") == 0)


def test_min_instances_start_one_at_deploy_and_keep_it(fast: Emulator) -> None:
    service = create(fast, min_instances=1)
    until(lambda: fast.instances("sdxl-server") == 1)
    fast.world.run_idle_s = 0
    fast.scale_to_zero("sdxl-server")
    assert fast.instances("sdxl-server") == 1
    assert call(fast, service).status_code == 200 and fast.instance_starts("sdxl-server") == 1


def test_a_new_revision_replaces_the_instance_and_delete_stops_the_listener(fast: Emulator) -> None:
    service = create(fast)
    assert call(fast, service).status_code == 200
    service.template.max_instance_request_concurrency = 2
    updated = client(fast.url).update_service(service=service).result(30)
    assert updated.uri == service.uri and updated.latest_ready_revision != service.latest_ready_revision
    assert fast.instances("sdxl-server") == 0  # the old revision's instance went with it
    client(fast.url).delete_service(name=service.name).result(30)
    until(lambda: _refused(service.uri))


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.TransportError:
        return True
    return False


def test_monitoring_counts_the_instances_and_their_seconds(fast: Emulator) -> None:
    service = create(fast)
    assert call(fast, service).status_code == 200
    count = _series(fast, "instance_count", "sdxl-server")
    assert count["timeSeries"][0]["metric"]["labels"] == {"state": "active"}
    assert count["timeSeries"][0]["points"][0]["value"] == {"int64Value": "1"}
    billed = _series(fast, "billable_instance_time", "sdxl-server")
    assert billed["timeSeries"][0]["points"][0]["value"]["doubleValue"] > 0
    fast.scale_to_zero("sdxl-server")
    assert _series(fast, "instance_count", "sdxl-server")["timeSeries"][0]["points"][0]["value"] == {"int64Value": "0"}
    assert _series(fast, "instance_count", "other") == {}  # a service that never ran has no series
    bad = httpx.get(f"{fast.url}/v3/projects/{PROJECT}/timeSeries", params={"filter": "nonsense"})
    assert bad.status_code == 400 and "filter" in bad.json()["error"]["message"]


def _series(emulator: Emulator, metric: str, service_id: str) -> dict[str, Any]:
    answer = httpx.get(
        f"{emulator.url}/v3/projects/{PROJECT}/timeSeries",
        params={
            "filter": f'metric.type="run.googleapis.com/container/{metric}" AND '
            f'resource.labels.service_name="{service_id}"',
            "interval.startTime": "2020-01-01T00:00:00Z",
            "interval.endTime": "2100-01-01T00:00:00Z",
        },
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


# ---------------------------------------------------------------- a slow container: 429 and 504


@pytest.fixture
def slow_emulator(gcs: str) -> Iterator[tuple[Emulator, threading.Event]]:
    """An emulator whose "-server" instances are a stand-in that holds /slow until the test lets it go."""
    release = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            await asyncio.to_thread(release.wait, 30)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    world = World(run_probe_scale=0.01, run_idle_s=3600)
    with serve_app(app) as stand_in, serve_app(create_app(world, servers=ModelServers(forward_to=stand_in.url))) as em:
        yield Emulator(em.url, gcs, world), release
        release.set()


def test_more_requests_than_concurrency_get_429_and_a_request_past_the_timeout_504(
    slow_emulator: tuple[Emulator, threading.Event],
) -> None:
    emulator, release = slow_emulator
    service = create(emulator, concurrency=1, timeout_s=1)
    answers: list[httpx.Response] = []
    held = threading.Thread(target=lambda: answers.append(call(emulator, service, path="/slow")))
    held.start()
    until(lambda: emulator.instances("sdxl-server") == 1)
    busy = call(emulator, service)
    assert busy.status_code == 429 and busy.text == "Rate exceeded."
    held.join(30)
    assert answers[0].status_code == 504 and answers[0].text == "upstream request timeout"
    release.set()
    assert call(emulator, service).status_code == 200  # the slot is free again


# ---------------------------------------------------------------- real processes


def test_a_container_that_exits_at_start_gives_503_and_a_good_one_serves_until_the_emulator_stops(
    gcs: str, tmp_path: Path
) -> None:
    """Each instance runs the image's command (`python -m sdxl_server`) as a process of its own."""
    world = World(run_probe_scale=0.1, run_idle_s=3600)  # 60 tries a second apart: a loaded machine starts slowly
    app = create_app(world, servers=ModelServers(log_dir=tmp_path), gcs_url=gcs)
    with serve_app(app) as server:
        emulator = Emulator(server.url, gcs, world)
        broken = create(emulator, "broken-server", env={"SDXL_DTYPE": "fp64"})
        answer = call(emulator, broken)
        assert answer.status_code == 503 and "Service Unavailable" in answer.text
        assert emulator.instances("broken-server") == 0

        good = create(emulator, env={"SDXL_MODEL": "tiny", "SDXL_WARMUP": "64x64"})
        health = call(emulator, good)  # the first request waits through the cold start
        assert health.status_code == 200 and health.json()["status"] == "ready", health.text
        assert emulator.instances("sdxl-server") == 1
        process = app.state.instances.find("sdxl-server").instance.process
        assert process.poll() is None
    assert process.poll() is not None  # no instance outlives the emulator
