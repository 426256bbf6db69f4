"""The whole lifecycle on target cloudrun through the CLI, against the emulator, with the real client libraries:
build, deploy (plan, create, the same again, one field changed), predict (also the first request after scale to
zero), ui-deploy (the UI calls the model with its own ID token), status, teardown found by label."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, REGION, Emulator

SMALL = ["--steps", "2", "--width", "64", "--height", "64"]
SERVER = f"projects/{PROJECT}/locations/{REGION}/services/sdxl-server"
UI_ACCOUNT = f"sdxl-ui-sa@{PROJECT}.iam.gserviceaccount.com"
# A generate call as the page's API takes it (tests/ui/test_api.py): prompt, negative, style, seed, random seed,
# width, height, steps, guidance, images, scheduler, LoRA, LoRA scale; then the unused image inputs.
GENERATE = ("a lighthouse", "", "pixel-art", 7, False, 64, 64, 2, 5.0, 1, "dpmpp_2m", "none", 0.8, None, 0.8, None, 1.0)


def env_of(emulator: Emulator, **extra: str) -> dict[str, str]:
    return emulator.env(SDXLCTL_TARGET="cloudrun", **extra)


def up(cli: Cli, env: dict[str, str], *steps: str) -> None:
    for step in steps:
        result = cli(step, env=env)
        assert result.code == 0, (step, result.err)


def writes(emulator: Emulator, since: int = 0) -> list[dict[str, Any]]:
    return [r for r in emulator.requests()[since:] if r["method"] != "GET"]


def services(emulator: Emulator) -> dict[str, dict[str, Any]]:
    return {s["name"].rsplit("/", 1)[-1]: s for s in emulator.resources().get("services", [])}


def id_token_of(emulator: Emulator, audience: str) -> str:
    """The deployer's ID token for `audience`, from its key file through google-auth (what gcloud would give)."""
    import google.auth.transport.requests
    from google.oauth2 import service_account

    credentials = service_account.IDTokenCredentials.from_service_account_file(
        str(emulator.key_file()), target_audience=audience
    )
    credentials.refresh(google.auth.transport.requests.Request())
    return str(credentials.token)


def set_invokers(emulator: Emulator, members: list[str]) -> None:
    """What someone with the console would do: the model service's invoker binding set to `members`."""
    from google.iam.v1 import iam_policy_pb2, policy_pb2

    from tests.cloudrun_target.made import run_client

    bindings = [policy_pb2.Binding(role="roles/run.invoker", members=members)] if members else []
    run_client(emulator.url).set_iam_policy(
        iam_policy_pb2.SetIamPolicyRequest(resource=SERVER, policy=policy_pb2.Policy(bindings=bindings))
    )


def test_deploy_plans_creates_keeps_and_updates_one_field(cli: Cli, emulator: Emulator) -> None:
    env = env_of(emulator)
    up(cli, env, "build")
    plan = cli("deploy", "--dry-run", env=env)
    assert plan.code == 0, plan.err
    assert re.search(r"create.*sdxl-server", plan.err + plan.out), plan.err
    assert "services" not in emulator.resources() or services(emulator) == {}  # a plan makes nothing
    up(cli, env, "deploy")
    server = services(emulator)["sdxl-server"]
    template = server["template"]
    assert template["serviceAccount"] == f"sdxl-server-sa@{PROJECT}.iam.gserviceaccount.com"
    assert template["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert template["nodeSelector"]["accelerator"] == "nvidia-l4"

    before = len(emulator.requests())
    again = cli("deploy", env=env)
    assert again.code == 0 and "unchanged" in again.err, again.err
    assert writes(emulator, before) == []
    assert "unchanged" in cli("deploy", "--dry-run", env=env).err

    before = len(emulator.requests())
    changed = cli("deploy", env={**env, "SDXLCTL_CLOUDRUN_MAX_INSTANCES": "2"})
    assert changed.code == 0, changed.err
    sent = writes(emulator, before)
    assert [(r["method"], r["path"].rsplit("/", 1)[-1]) for r in sent] == [("PATCH", "sdxl-server")], sent
    (name,) = services(emulator)
    assert services(emulator)[name]["template"]["scaling"]["maxInstanceCount"] == 2


def test_build_deploy_predict_ui_status_teardown(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    """The model's instance is the shared tiny server (forward mode); the UI is a real `python -m sdxl_ui`
    that the emulator starts on the first request to the UI's URL, with the UI account's metadata server."""
    from gradio_client import Client

    env = env_of(emulator)
    up(cli, env, "build", "deploy")
    predicted = cli("predict", "a red fox in snow", "-o", "fox.png", "--seed", "4", *SMALL, env=env)
    assert predicted.code == 0, predicted.err
    with Image.open(tmp_path / "fox.png") as image:
        assert (image.format, image.size) == ("PNG", (64, 64))

    ui = cli("ui-deploy", env=env)
    assert ui.code == 0, ui.err
    ui_url = ui.out.strip().splitlines()[-1]
    assert ui_url == services(emulator)["sdxl-ui"]["uri"]
    # The UI's account may invoke the model's service, and nobody else was let in
    from tests.cloudrun_target.made import invokers

    assert invokers(emulator, SERVER) == [f"serviceAccount:{UI_ACCOUNT}"]

    headers = {"Authorization": f"Bearer {id_token_of(emulator, ui_url)}"}
    # The first request starts the UI's instance (Gradio's import takes a while); gradio_client's own
    # timeout for the page's config is shorter than that start
    page = httpx.get(ui_url + "/config", headers=headers, timeout=300)
    assert page.status_code == 200, page.text
    assert httpx.get(ui_url + "/config", timeout=30).status_code == 401  # private: no token, no page
    client = Client(ui_url, headers=headers, verbose=False, download_files=str(tmp_path / "downloads"))
    gallery, info, _ = client.predict(*GENERATE, api_name="/generate")
    assert info.startswith("**Seed 7"), info
    assert len(gallery) == 1 and Path(gallery[0]["image"]).is_file()
    # Taking the grant away refuses the UI's next call: its token was the UI account's own, not the deployer's
    set_invokers(emulator, [])
    _, refused, _ = client.predict(*GENERATE, api_name="/generate")
    assert "Not allowed to call the model" in refused, refused
    set_invokers(emulator, [f"serviceAccount:{UI_ACCOUNT}"])

    status = cli("status", "--json", env=env)
    assert status.code == 0, status.err
    rows = {row["kind"]: row for row in json.loads(status.out)["resources"]}
    assert {"server-image", "server-service", "server-account", "ui-image", "ui-service", "ui-account"} <= set(rows)
    assert rows["server-service"]["state"].startswith("ready"), rows["server-service"]

    (tmp_path / ".sdxlctl" / "state.json").unlink()  # everything is found by its label
    down = cli("teardown", "--yes", env=env)
    assert down.code == 0, down.err
    assert emulator.labelled() == []
    assert services(emulator) == {}
    assert emulator.resources().get("accounts", []) == []


def spinner_phases(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The phases the CLI's spinner is given (Rich draws none of them where stderr is not a terminal)."""
    from sdxlctl.cli import commands

    phases: list[str] = []

    @contextlib.contextmanager
    def recorded(title: str) -> Iterator[Callable[[str], None]]:
        phases.append(title)
        yield phases.append

    monkeypatch.setattr(commands, "progress", recorded)
    return phases


def test_the_first_request_after_scale_to_zero_starts_an_instance(
    cli: Cli, real_emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One real `python -m sdxl_server` per instance, started by the emulator with PORT as Cloud Run does."""
    emulator = real_emulator
    emulator.world.run_probe_scale = 0.05  # the startup probe every 0.5 s instead of 10 s
    env = env_of(emulator)
    up(cli, env, "build", "deploy")
    assert emulator.instances("sdxl-server") == 0  # min instances 0: nothing runs before a request
    first = cli("predict", "a fox", "-o", "one.png", *SMALL, env=env)
    assert first.code == 0, first.err
    assert emulator.instances("sdxl-server") == 1

    emulator.scale_to_zero("sdxl-server")
    assert emulator.instances("sdxl-server") == 0
    phases = spinner_phases(monkeypatch)
    second = cli("predict", "a fox", "-o", "two.png", "--seed", "5", *SMALL, env=env)
    assert second.code == 0, second.err
    assert phases[0] == "generating" and phases[1] == "starting an instance (cold start)", phases
    with Image.open(tmp_path / "two.png") as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    assert emulator.instances("sdxl-server") == 1
    assert cli("teardown", "--yes", env=env).code == 0
    assert emulator.labelled() == []
