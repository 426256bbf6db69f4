"""A target-cloudrun deployment made in the emulator through google-cloud-run and IAM's REST API, and recorded
as deploy and ui-deploy record it; and Cloud Monitoring's timeSeries route in front of the emulator."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from sdxlctl.state import Resource, StateStore
from tests.emulator_fixtures import PROJECT, REGION, Emulator
from tests.servers import serve_app

BUCKET = f"{PROJECT}-sdxlctl"  # the staging bucket: the compile cache's, which the server's account may write
CACHE_ROLE = "roles/storage.objectUser"


def env(emulator: Emulator, **extra: str) -> dict[str, str]:
    return emulator.env(SDXLCTL_TARGET="cloudrun", **extra)


def email(account_id: str) -> str:
    return f"{account_id}@{PROJECT}.iam.gserviceaccount.com"


def run_client(url: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import run_v2

    return run_v2.ServicesClient(
        credentials=AnonymousCredentials(), transport="rest", client_options={"api_endpoint": url}
    )


def _service(name: str, image: str, account: str, *, gpu: bool) -> Any:
    from google.cloud import run_v2

    labels = {"sdxlctl-deployment": name, "managed-by": "sdxlctl"}
    limits = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"} if gpu else {"cpu": "1", "memory": "1Gi"}
    template = run_v2.RevisionTemplate(
        service_account=account,
        labels=labels,
        scaling=run_v2.RevisionScaling(min_instance_count=0, max_instance_count=1),
        containers=[
            run_v2.Container(
                image=image,
                ports=[run_v2.ContainerPort(name="http1", container_port=8080)],
                resources=run_v2.ResourceRequirements(limits=limits, cpu_idle=not gpu, startup_cpu_boost=True),
            )
        ],
    )
    if gpu:
        template.node_selector = run_v2.NodeSelector(accelerator="nvidia-l4")
        template.gpu_zonal_redundancy_disabled = True
    return run_v2.Service(labels=labels, ingress=run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL, template=template)


def deploy(emulator: Emulator, home: Path, name: str = "sdxl", *, ui: bool = True) -> dict[str, Any]:
    """The model's service (and the UI's) with their accounts, the UI's invoker grant, the server's bucket
    grant; recorded in `home`'s state as the steps record them. The live services by kind."""
    from google.iam.v1 import iam_policy_pb2, policy_pb2

    client = run_client(emulator.url)
    parent = f"projects/{PROJECT}/locations/{REGION}"
    image = f"{REGION}-docker.pkg.dev/{PROJECT}/sdxlctl/{name}"
    parts = [("server", True)] + ([("ui", False)] if ui else [])
    store, live = StateStore(home), {}
    for part, gpu in parts:
        account = email(f"{name}-{part}-sa")
        created = httpx.post(
            f"{emulator.url}/v1/projects/{PROJECT}/serviceAccounts", json={"accountId": f"{name}-{part}-sa"}
        )
        assert created.status_code == 200, created.text
        body = _service(name, f"{image}-{part}:v1", account, gpu=gpu)
        service = client.create_service(parent=parent, service=body, service_id=f"{name}-{part}").result(timeout=30)
        live[f"{part}-service"] = service
        revision = service.latest_ready_revision.rsplit("/", 1)[-1]
        details: dict[str, Any] = {"revision": revision, "account": account}
        if gpu:
            details |= {"gpu": "l4", "cpu": 8, "memory_gib": 32, "min_instances": 0, "max_instances": 1}
            details |= {"zonal_redundancy": False, "timeout_s": 600, "deployed_at": datetime.now(UTC).isoformat()}
        store.record(
            name,
            Resource(kind=f"{part}-service", name=service.name, target="cloudrun", url=service.uri, details=details),
        )
        buckets = [BUCKET] if part == "server" else []
        store.record(
            name,
            Resource(
                kind=f"{part}-account",
                name=account,
                target="cloudrun",
                details={"buckets": buckets} if part == "server" else {},
            ),
        )
    server = live["server-service"]
    if ui:
        member = f"serviceAccount:{email(f'{name}-ui-sa')}"
        policy = policy_pb2.Policy(bindings=[policy_pb2.Binding(role="roles/run.invoker", members=[member])])
        client.set_iam_policy(iam_policy_pb2.SetIamPolicyRequest(resource=server.name, policy=policy))
    storage = emulator.storage()
    bucket = storage.lookup_bucket(BUCKET) or storage.create_bucket(BUCKET)
    policy = bucket.get_iam_policy(requested_policy_version=3)
    policy.bindings.append({"role": CACHE_ROLE, "members": {f"serviceAccount:{email(f'{name}-server-sa')}"}})
    bucket.set_iam_policy(policy)
    return live


def invokers(emulator: Emulator, service_name: str) -> list[str]:
    from google.iam.v1 import iam_policy_pb2

    policy = run_client(emulator.url).get_iam_policy(iam_policy_pb2.GetIamPolicyRequest(resource=service_name))
    return sorted(m for b in policy.bindings if b.role == "roles/run.invoker" for m in b.members)


@dataclass
class Metrics:
    """What the Monitoring stand-in answers, by service id: instances now, billed seconds; and what it was asked."""

    instances: dict[str, int] = field(default_factory=dict)
    billed: dict[str, float] = field(default_factory=dict)
    refuse: int = 0  # an HTTP status to answer with instead (403: the API is not enabled)
    asked: list[dict[str, str]] = field(default_factory=list)


def monitoring_app(metrics: Metrics) -> Callable[..., Any]:
    """Cloud Monitoring's projects.timeSeries.list for Cloud Run's two container metrics, as Google answers."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        query = dict(request.query_params)
        metrics.asked.append({"path": request.url.path, **query})
        if metrics.refuse:
            error = {"error": {"code": metrics.refuse, "message": "Cloud Monitoring API has not been used"}}
            await JSONResponse(error, status_code=metrics.refuse)(scope, receive, send)
            return
        service = query.get("filter", "").partition('service_name="')[2].partition('"')[0]
        interval = {"startTime": query.get("interval.startTime"), "endTime": query.get("interval.endTime")}
        series = []
        if "instance_count" in query.get("filter", "") and service in metrics.instances:
            value = {"int64Value": str(metrics.instances[service])}
            series.append(
                {"metric": {"labels": {"state": "active"}}, "points": [{"interval": interval, "value": value}]}
            )
        if "billable_instance_time" in query.get("filter", "") and service in metrics.billed:
            # two per-minute deltas that add up to the total
            half = {"doubleValue": metrics.billed[service] / 2}
            series.append({"metric": {}, "points": [{"interval": interval, "value": half}] * 2})
        await JSONResponse({"timeSeries": series} if series else {})(scope, receive, send)

    return app


@contextmanager
def with_monitoring(emulator: Emulator, metrics: Metrics) -> Iterator[Emulator]:
    """The emulator behind a front that answers /v3/.../timeSeries itself and passes everything else on."""
    app = monitoring_app(metrics)

    async def front(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v3/") and scope["path"].endswith("/timeSeries"):
            await app(scope, receive, send)
            return
        if scope["type"] == "lifespan":  # the emulator's own lifespan runs with its own server
            message = await receive()
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            del message
            await send({"type": "lifespan.shutdown.complete"})
            return
        await _forward(emulator.url, scope, receive, send)

    with serve_app(front) as server:
        yield Emulator(server.url, emulator.gcs_url, emulator.world)


async def _forward(url: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
    from starlette.requests import Request
    from starlette.responses import Response

    request = Request(scope, receive)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.request(
            request.method,
            url + request.url.path,
            params=request.url.query,
            headers=headers,
            content=await request.body(),
        )
    kept = {k: v for k, v in answer.headers.items() if k.lower() in ("content-type",)}
    await Response(answer.content, status_code=answer.status_code, headers=kept)(scope, receive, send)


def rows(result_out: str) -> dict[str, dict[str, Any]]:
    return {row["kind"]: row for row in json.loads(result_out)["resources"]}
