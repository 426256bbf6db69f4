"""`sdxlctl ui-deploy` on target cloudrun through the CLI, against the emulator, read back with google-cloud-run: the
UI runs as its own account, which may invoke the model's service and nothing else, and calls it with ID tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from sdxlctl.state import StateStore
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, REGION, Emulator

LOCATION = f"projects/{PROJECT}/locations/{REGION}"
PARENT = f"{LOCATION}/services"
UI_ACCOUNT = f"sdxl-ui-sa@{PROJECT}.iam.gserviceaccount.com"


def _env(emulator: Emulator, **extra: str) -> dict[str, str]:
    return emulator.env(SDXLCTL_TARGET="cloudrun", **extra)


def _client(emulator: Emulator) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import run_v2

    return run_v2.ServicesClient(
        credentials=AnonymousCredentials(), transport="rest", client_options={"api_endpoint": emulator.url}
    )


def _invokers(emulator: Emulator) -> dict[str, dict[str, list[str]]]:
    """Every service's IAM policy as role -> members, read with google-cloud-run."""
    client = _client(emulator)
    policies = {}
    for service in client.list_services(parent=LOCATION):
        policy = client.get_iam_policy(request={"resource": service.name})
        policies[service.name.rpartition("/")[2]] = {b.role: sorted(b.members) for b in policy.bindings}
    return policies


def _writes(emulator: Emulator, since: int) -> list[str]:
    return [f"{r['method']} {r['path']}" for r in emulator.requests()[since:] if r["method"] != "GET"]


def test_ui_deploy_needs_the_model_service_first(cli: Cli, emulator: Emulator) -> None:
    result = cli("ui-deploy", env=_env(emulator))
    assert result.code == 1 and "the UI needs the model's Cloud Run service" in result.err
    assert "run `sdxlctl deploy` first" in result.err and "Traceback" not in result.err
    assert emulator.resources().get("services", []) == []


def test_the_ui_may_invoke_the_model_service_only(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    env = _env(emulator, SDXLCTL_MODEL_LORAS="fox=some-org/fox-lora@v2")
    for step in ("build", "deploy"):
        done = cli(step, env=env)
        assert done.code == 0, done.err
    ui = cli("ui-deploy", env=env)
    assert ui.code == 0, ui.err
    state = StateStore(tmp_path / ".sdxlctl").read()
    server, service = state.get("sdxl", "server-service"), state.get("sdxl", "ui-service")
    account = state.get("sdxl", "ui-account")
    assert server is not None and service is not None and account is not None
    assert (service.target, account.target, account.name) == ("cloudrun", "cloudrun", UI_ACCOUNT)
    assert ui.out.strip() == service.url

    # the UI's account holds roles/run.invoker on the model's service, nothing on its own or anything else
    policies = _invokers(emulator)
    assert policies["sdxl-server"] == {"roles/run.invoker": [f"serviceAccount:{UI_ACCOUNT}"]}
    assert f"serviceAccount:{UI_ACCOUNT}" not in json.dumps(policies["sdxl-ui"])
    live = _client(emulator).get_service(name=f"{PARENT}/sdxl-ui")
    assert not live.invoker_iam_disabled  # private: callers need roles/run.invoker
    assert live.template.service_account == UI_ACCOUNT
    (container,) = live.template.containers
    assert dict(container.resources.limits) == {"cpu": "1", "memory": "1Gi"}
    assert {e.name: e.value for e in container.env} == {
        "SDXL_ENDPOINT": server.url,
        "SDXL_AUTH": "id-token",
        "SDXL_UI_MAX_IMAGES": "4",
        "SDXL_UI_MAX_REQUEST_BYTES": str(32 * 1024 * 1024),
        "SDXL_UI_REFINER": "0",
        "SDXL_UI_LORAS": "fox",
    }

    # the same config again: nothing written, the service and the grant unchanged
    before = len(emulator.requests())
    again = cli("ui-deploy", env=env)
    assert again.code == 0, again.err
    assert _writes(emulator, before) == [] and "unchanged" in again.err
    assert _invokers(emulator) == policies

    # a changed config updates the service, in place, and still grants only the one role
    changed = cli("ui-deploy", env={**env, "SDXLCTL_MODEL_MAX_IMAGES": "2"})
    assert changed.code == 0, changed.err
    assert [w for w in _writes(emulator, before) if "/services" in w] == [f"PATCH /v2/{PARENT}/sdxl-ui"]
    (container,) = _client(emulator).get_service(name=f"{PARENT}/sdxl-ui").template.containers
    assert {e.name: e.value for e in container.env}["SDXL_UI_MAX_IMAGES"] == "2"
    assert _invokers(emulator) == policies


def test_public_only_when_asked(cli: Cli, emulator: Emulator) -> None:
    env = _env(emulator)
    for step in (["build"], ["deploy"], ["ui-deploy", "--public"]):
        done = cli(*step, env=env)
        assert done.code == 0, done.err
    assert _client(emulator).get_service(name=f"{PARENT}/sdxl-ui").invoker_iam_disabled
    # the model's service stays private whatever the UI is
    assert not _client(emulator).get_service(name=f"{PARENT}/sdxl-server").invoker_iam_disabled


def test_the_dry_run_plans_without_writing(cli: Cli, emulator: Emulator) -> None:
    env = _env(emulator)
    before = len(emulator.requests())
    plan = cli("ui-deploy", "--dry-run", env=env)
    assert plan.code == 0, plan.err
    text = " ".join((plan.out + plan.err).split())
    assert UI_ACCOUNT in text and "roles/run.invoker on sdxl-server" in text
    assert "sdxl-ui" in text and "private" in text and "with its own ID token" in text
    assert _writes(emulator, before) == []


def _id_token(emulator: Emulator, audience: str) -> str:
    """The deployer's ID token for `audience` (a project owner may invoke every service), from its key file."""
    import google.auth.transport.requests
    from google.oauth2 import service_account

    credentials = service_account.IDTokenCredentials.from_service_account_file(
        str(emulator.key_file()), target_audience=audience
    )
    credentials.refresh(google.auth.transport.requests.Request())
    return str(credentials.token)


def _generate(client: Any) -> str:
    """One image through the page's API; the page's sentence about it."""
    _, info, _ = client.predict(
        *("a lighthouse", "", "pixel-art", 7, False, 64, 64, 2, 5.0, 1, "dpmpp_2m", "none", 0.8),
        *(None, 0.8, None, 1.0),  # image to image and inpainting: unused in text to image
        api_name="/generate",
    )
    return str(info)


def test_the_ui_calls_the_model_with_its_own_id_token(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    from gradio_client import Client

    env = _env(emulator)
    for step in ("build", "deploy", "ui-deploy"):
        done = cli(step, env=env)
        assert done.code == 0, done.err
    ui = StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "ui-service")
    assert ui is not None and ui.url
    # the page is private too: the deployer opens it with an ID token of its own
    headers = {"Authorization": f"Bearer {_id_token(emulator, ui.url)}"}
    # the first request starts the UI's instance (a cold start): gradio_client's own wait for its config is 5 s
    assert httpx.get(ui.url, headers=headers, timeout=120).status_code == 200
    client = Client(ui.url, headers=headers, verbose=False, download_files=str(tmp_path / "downloads"))
    assert _generate(client).startswith("**Seed 7**")
    assert emulator.instance_starts("sdxl-ui") == 1

    # the UI's own account is what the model's service lets in: without its grant the page is refused
    _client(emulator).set_iam_policy(request={"resource": f"{PARENT}/sdxl-server", "policy": {"bindings": []}})
    refused = _generate(client)
    assert (
        refused.startswith("⚠️ Not allowed to call the model (check the service account's role") and "<" not in refused
    )


def test_a_model_service_deleted_behind_sdxlctls_back_stops_ui_deploy_before_the_build(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    env = _env(emulator)
    for step in ("build", "deploy"):
        assert cli(step, env=env).code == 0
    _client(emulator).delete_service(name=f"{PARENT}/sdxl-server").result()
    before = len(emulator.requests())
    result = cli("ui-deploy", env=env)
    assert result.code == 1 and "the model's Cloud Run service sdxl-server is gone" in result.err, result.err
    assert "run `sdxlctl deploy` first" in result.err
    assert _writes(emulator, before) == []  # no UI image built, no account made
    assert StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "ui-image") is None
