"""Review R1 of target cloudrun: the caller's ID token goes only to the URL Cloud Run reports for the service
(never to a URL a tampered state file names), and an answer is read no further than Cloud Run's limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdxlctl.errors import DeployError, PredictError
from tests.cloudrun_target import test_predict
from tests.cloudrun_target.test_predict import ANSWER, BODY, Front, cloudrun_predict, deployment
from tests.servers import serve_app

issuer, front = test_predict.issuer, test_predict.front  # its fixtures: a token endpoint, Cloud Run's front end


class Trap:
    """A listener a tampered state points at: it records every Authorization header it is sent."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def app(self) -> object:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        async def anything(request: Request) -> Response:
            self.seen.append(request.headers.get("authorization", ""))
            return JSONResponse({"status": "ready", **ANSWER})

        return Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST"])])


@pytest.mark.parametrize("form", ["{trap}", "http://user:pw@{host}", "{trap}/x?y=1"], ids=["url", "userinfo", "path"])
def test_a_tampered_state_url_never_receives_the_token(front: Front, tmp_path: Path, form: str) -> None:
    trap = Trap()
    with serve_app(trap.app()) as server:
        tampered = form.format(trap=server.url, host=server.url.removeprefix("http://"))
        config, store = deployment(tmp_path, tampered, api=front.url)
        answer, where = cloudrun_predict.predict(config, store, BODY, timeout_s=30, sleep=lambda _: None)
    assert answer == ANSWER and where == front.url  # the service's own URL, as Cloud Run reports it
    assert trap.seen == []
    assert front.seen == ["health", "predict"]


@pytest.mark.parametrize(
    "uri",
    [
        "http://evil.example",
        "file:///etc/passwd",
        "https://u:p@sdxl-server-x.a.run.app",
        "https://evil.example",
        "https://sdxl-server-x.a.run.app.evil.example",
        "https://sdxl-server-x.a.run.app:8443",
        "http://localhost:1",
    ],
)
def test_a_uri_that_is_not_a_cloud_run_services_gets_no_token(front: Front, tmp_path: Path, uri: str) -> None:
    front.uri = uri
    config, store = deployment(tmp_path, front.url, api=front.url)
    with pytest.raises(DeployError, match=r"not a Cloud Run service's .*no ID token is sent there"):
        cloudrun_predict.predict(config, store, BODY, timeout_s=30)
    assert front.seen == [] and front.issuer.asked == []


@pytest.mark.parametrize(
    ("uri", "emulated", "trusted"),
    [
        ("https://sdxl-server-abc-ez.a.run.app", False, "https://sdxl-server-abc-ez.a.run.app"),
        ("https://SDXL-server-abc-ez.a.run.app/", False, "https://sdxl-server-abc-ez.a.run.app"),
        ("http://127.0.0.1:8123", True, "http://127.0.0.1:8123"),
        ("http://127.0.0.1:8123", False, None),  # plain http only against the emulator
        ("https://127.0.0.1.run.app@evil.example", False, None),
        ("https://evil.example#.run.app", False, None),
    ],
)
def test_trusted_url(uri: str, emulated: bool, trusted: str | None) -> None:
    if trusted is None:
        with pytest.raises(DeployError):
            cloudrun_predict.trusted_url(uri, emulated=emulated, service="sdxl-server")
    else:
        assert cloudrun_predict.trusted_url(uri, emulated=emulated, service="sdxl-server") == trusted


def test_a_huge_answer_without_content_length_is_not_read_whole(front: Front, tmp_path: Path) -> None:
    """A chunked body (no Content-Length) past 32 MiB: refused once the limit is passed, not read into memory."""

    async def endless() -> Any:
        for _ in range(1024):  # 64 MiB if read to the end
            yield b"x" * 65536

    front.answers = [(200, endless(), {})]
    config, store = deployment(tmp_path, front.url, api=front.url)
    with pytest.raises(PredictError, match="over Cloud Run's 32 MiB response limit"):
        cloudrun_predict.predict(config, store, BODY, timeout_s=30)


@pytest.mark.parametrize(
    ("retry_after", "slept"),
    [("-5", 1.0), ("Wed, 21 Oct 2099 07:28:00 GMT", 1.0), ("1e12", 30.0), ("nan", 1.0), ("inf", 30.0)],
)
def test_a_hostile_retry_after_is_bounded(front: Front, tmp_path: Path, retry_after: str, slept: float) -> None:
    front.answers = [(429, "<html>busy</html>", {"Retry-After": retry_after})]
    config, store = deployment(tmp_path, front.url, api=front.url)
    waits: list[float] = []
    answer, _ = cloudrun_predict.predict(config, store, BODY, timeout_s=30, sleep=waits.append)
    assert answer == ANSWER and waits == [slept]


def test_a_model_service_made_public_by_hand_is_private_again_after_deploy(cli: Any, emulator: Any) -> None:
    """`gcloud run services add-iam-policy-binding --member=allUsers` on the model's service: the next deploy
    takes it away (the service is private whatever happened to it), and says so."""
    from tests.cloudrun_target.test_deploy import SERVICE, _client, _env, _up

    env = _env(emulator)
    _up(cli, env, "build", "deploy")
    client = _client(emulator)
    policy = client.get_iam_policy(request={"resource": SERVICE})
    policy.bindings.add(role="roles/run.invoker", members=["allUsers", "allAuthenticatedUsers"])
    client.set_iam_policy(request={"resource": SERVICE, "policy": policy})
    again = cli("deploy", env=env)
    assert again.code == 0, again.err
    assert "removed allUsers" in again.err and "removed allAuthenticatedUsers" in again.err
    members = [m for b in client.get_iam_policy(request={"resource": SERVICE}).bindings for m in b.members]
    assert "allUsers" not in members and "allAuthenticatedUsers" not in members


def _cost_config(tmp_path: Path, api: str) -> Any:
    from sdxlctl.config import load_config

    path = tmp_path / "sdxlctl.toml"
    path.write_text('target = "cloudrun"\n[gcp]\nproject = "demo-project"\nregion = "us-central1"\n')
    return load_config(path, {"SDXLCTL_GCP_API_ENDPOINT": api})


@pytest.mark.parametrize(
    "details",
    [
        {"deployed_at": "yesterday", "min_instances": 1},
        {"deployed_at": 1733000000, "min_instances": 1},
        {"deployed_at": "2999-01-01T00:00:00+00:00", "min_instances": 1},
        {"deployed_at": "2026-01-01T00:00:00", "min_instances": -3},
        {"deployed_at": "2026-01-01T00:00:00", "min_instances": "many"},
        {"deployed_at": "2026-01-01T00:00:00", "min_instances": 1, "cpu": "nan", "memory_gib": -64},
    ],
    ids=["not-a-date", "a-number", "future", "negative-min", "min-not-a-number", "nan-cpu"],
)
def test_a_hostile_state_gives_no_negative_nan_or_traceback_cost(tmp_path: Path, details: dict[str, Any]) -> None:
    """Monitoring unreadable (nothing answers), so the standing instances' cost from the state's details."""
    import math
    from datetime import UTC, datetime

    from sdxlctl.cloudrun.inventory import cost_so_far
    from sdxlctl.state import Resource
    from tests.servers import free_port

    config = _cost_config(tmp_path, f"http://127.0.0.1:{free_port()}")
    name = "projects/demo-project/locations/us-central1/services/sdxl-server"
    resource = Resource(kind="server-service", name=name, target="cloudrun", details=details)
    cost = cost_so_far(config, resource, datetime.now(UTC))
    assert cost is None or (math.isfinite(cost) and cost >= 0), cost


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "-5", {"x": 1}])
def test_a_hostile_monitoring_answer_is_unknown_not_a_crash(tmp_path: Path, value: Any) -> None:
    import math
    from datetime import UTC, datetime, timedelta

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from sdxlctl.gcp.monitoring import billable_seconds, instance_count
    from sdxlctl.vertex.names import cloud

    async def series(request: Request) -> Response:
        point = {"interval": {"endTime": "2026-12-02T22:00:00Z"}, "value": {"doubleValue": value}}
        return JSONResponse({"timeSeries": [{"points": [point, "not a point"]}, {"points": {"a": 1}}]})

    with serve_app(Starlette(routes=[Route("/v3/projects/demo-project/timeSeries", series)])) as server:
        c = cloud(_cost_config(tmp_path, server.url))
        now = datetime.now(UTC)
        count = instance_count(c, "sdxl-server", now=now)
        seconds = billable_seconds(c, "sdxl-server", now - timedelta(hours=1), now)
    assert count is None or count >= 0
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)


@pytest.mark.parametrize("seconds", [float("nan"), float("inf")])
def test_billed_seconds_refuses_what_is_not_a_time(seconds: float) -> None:
    from sdxlctl.errors import UsageError
    from sdxlctl.pricing.cloudrun import billed_seconds

    with pytest.raises(UsageError, match="instance-seconds"):
        billed_seconds(seconds)


def test_teardown_takes_only_this_deployments_accounts_and_services(tmp_path: Path, emulator: Any) -> None:
    """A tampered state naming another account (the default compute one) or another service of the project:
    teardown's inventory leaves them out (it deletes only what sdxlctl names for this deployment)."""
    from sdxlctl.cloudrun.inventory import inventory, plan_teardown
    from sdxlctl.config import load_config
    from sdxlctl.state import Resource, StateStore

    path = tmp_path / "sdxlctl.toml"
    path.write_text('target = "cloudrun"\n')
    env = emulator.env(SDXLCTL_TARGET="cloudrun")
    config = load_config(path, {k: v for k, v in env.items() if k.startswith("SDXLCTL_")})
    from google.cloud import run_v2

    from tests.cloudrun_target.test_deploy import _client

    parent = f"projects/{config.gcp.project}/locations/{config.gcp.region}"
    image = {"containers": [{"image": "us-docker.pkg.dev/cloudrun/container/hello"}]}
    service = run_v2.Service(template=image)
    _client(emulator).create_service(parent=parent, service=service, service_id="production-api").result()
    store = StateStore(tmp_path / ".sdxlctl")
    victim = "123-compute@developer.gserviceaccount.com"
    other = f"{parent}/services/production-api"
    store.record(config.name, Resource(kind="server-account", name=victim, target="cloudrun"))
    store.record(
        config.name, Resource(kind="server-service", name=other, target="cloudrun", details={"min_instances": "x"})
    )
    found = inventory(config, store, images=False)
    assert victim not in found.accounts
    assert found.services == []
    plan_teardown(config, store, images=False)  # no traceback for the state's odd min_instances


def test_ui_deploy_grants_and_calls_only_the_model_service_cloud_run_names(
    cli: Any, emulator: Any, tmp_path: Path
) -> None:
    """A state whose server-service names another service of the project: ui-deploy still gives its account
    roles/run.invoker on <name>-server only, and points SDXL_ENDPOINT at that service's own URL."""
    from google.cloud import run_v2

    from sdxlctl.state import StateStore
    from tests.cloudrun_target.test_deploy import _client, _env

    env = _env(emulator)
    for step in ("build", "deploy"):
        assert cli(step, env=env).code == 0
    client = _client(emulator)
    parent = "projects/demo-project/locations/europe-west4"
    image = {"containers": [{"image": "us-docker.pkg.dev/cloudrun/container/hello"}]}
    client.create_service(parent=parent, service=run_v2.Service(template=image), service_id="production-api").result()
    store = StateStore(tmp_path / ".sdxlctl")
    recorded = store.read().get("sdxl", "server-service")
    assert recorded is not None
    store.record("sdxl", recorded.model_copy(update={"name": f"{parent}/services/production-api"}))
    done = cli("ui-deploy", env=env)
    assert done.code == 0, done.err
    other = client.get_iam_policy(request={"resource": f"{parent}/services/production-api"})
    assert not [m for b in other.bindings for m in b.members if "sdxl-ui" in m]
    model = client.get_service(name=f"{parent}/services/sdxl-server")
    ui = client.get_service(name=f"{parent}/services/sdxl-ui")
    assert {e.name: e.value for e in ui.template.containers[0].env}["SDXL_ENDPOINT"] == model.uri


def test_a_tampered_state_name_cannot_widen_the_log_filter(tmp_path: Path) -> None:
    """A service name that closes the quote and adds `OR ...`: the filter names only a Cloud Run service id."""
    from sdxlctl.cloudrun.logs import _selector
    from sdxlctl.state import Resource

    config, store = deployment(tmp_path, "")
    name = 'projects/demo-project/locations/europe-west4/services/x") OR (logName:"anything'
    store.record(config.name, Resource(kind="server-service", name=name, target="cloudrun"))
    selector = _selector(config, store, ui=False)
    assert "logName" not in selector and selector.endswith('(resource.labels.service_name="sdxl-server")')
