"""The whole cloud lifecycle through the CLI, against the emulator, with the real client libraries."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from sdxlctl.state import StateStore
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator

SMALL = ["--steps", "2", "--width", "64", "--height", "64"]


def test_build_upload_deploy_predict_ui_status_teardown(cli: Cli, real_emulator: Emulator, tmp_path: Path) -> None:
    """The deployed model runs as the container would (`python -m sdxl_server` with Vertex's AIP_* env)."""
    env = real_emulator.env()
    for step in (["build"], ["upload"], ["deploy", "--gpu", "a100"]):
        result = cli(*step, env=env)
        assert result.code == 0, (step, result.err)
    predicted = cli("predict", "a red fox in snow", "-o", "fox.png", "--seed", "4", *SMALL, env=env)
    assert predicted.code == 0, predicted.err
    with Image.open(tmp_path / "fox.png") as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    assert "fox.png  seed 4" in predicted.out

    ui = cli("ui-deploy", env=env)
    assert ui.code == 0, ui.err
    (service,) = real_emulator.resources()["services"]
    assert ui.out.strip() == service["uri"]  # the emulator's front end for the service, on loopback

    status = json.loads(cli("status", "--json", env=env).out)
    kinds = {row["kind"] for row in status["resources"]}
    assert {"server-image", "model", "endpoint", "ui-image", "ui-account", "ui-service"} <= kinds

    down = cli("teardown", "--yes", env=env)
    assert down.code == 0, down.err
    assert real_emulator.labelled() == []
    assert real_emulator.resources().get("accounts", []) == []
    assert StateStore(tmp_path / ".sdxlctl").read().of("sdxl").keys() <= {"server-image", "ui-image"}


def test_the_same_config_again_changes_nothing(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    for step in (["build"], ["upload"], ["deploy"]):
        assert cli(*step, env=env).code == 0
    before = len(emulator.requests())
    for step in (["build"], ["upload"], ["deploy"]):
        again = cli(*step, env=env)
        assert again.code == 0 and "unchanged" in again.err, again.err
    writes = [r for r in emulator.requests()[before:] if r["method"] != "GET"]
    assert writes == [], writes


def test_a_new_gpu_redeploys_on_the_same_endpoint_and_retires_the_old_one(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    for step in (["build"], ["upload"], ["deploy", "--gpu", "a100"], ["deploy", "--gpu", "l4"]):
        assert cli(*step, env=env).code == 0
    (endpoint,) = emulator.resources()["endpoints"]
    (deployed,) = endpoint["deployedModels"]
    machine = deployed["dedicatedResources"]["machineSpec"]
    assert (machine["machineType"], machine["acceleratorType"]) == ("g2-standard-8", "NVIDIA_L4")
    assert cli("teardown", "--yes", env=env).code == 0


def test_a_changed_model_config_uploads_a_new_version(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    assert cli("build", env=env).code == 0
    assert cli("upload", env=env).code == 0
    changed = cli("upload", env={**env, "SDXLCTL_MODEL_QUEUE_SIZE": "1"})
    assert changed.code == 0 and changed.out.strip().endswith("@2"), changed.out
    (model,) = emulator.resources()["models"]
    assert model["versionId"] == "2"


def test_a_dedicated_endpoint_is_predicted_through_its_own_dns(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env(SDXLCTL_DEPLOY_ENDPOINT="dedicated")
    for step in (["build"], ["upload"], ["deploy"]):
        assert cli(*step, env=env).code == 0
    (endpoint,) = emulator.resources()["endpoints"]
    assert endpoint["dedicatedEndpointEnabled"] is True
    assert cli("predict", "a fox", "-o", "fox.jpg", *SMALL, env=env).code == 0
    (upload,) = [r for r in emulator.requests() if r["path"].endswith("models:upload")]
    container_env = {e["name"]: e["value"] for e in upload["body"]["model"]["containerSpec"]["env"]}
    assert container_env["SDXL_MAX_RESPONSE_BYTES"] == "10000000"


def test_predict_with_nothing_deployed_says_what_to_do(cli: Cli, emulator: Emulator) -> None:
    result = cli("predict", "a fox", env=emulator.env())
    assert result.code == 1 and "sdxlctl deploy" in result.err


def test_scale_to_zero_deploys_through_v1beta1_on_a_dedicated_endpoint(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env(
        SDXLCTL_DEPLOY_ENDPOINT="dedicated", SDXLCTL_DEPLOY_MIN_REPLICAS="0", SDXLCTL_DEPLOY_MAX_REPLICAS="2"
    )
    plan = cli("deploy", "--dry-run", env=env)
    assert "scale to zero (Preview)" in plan.err
    for step in (["build"], ["upload"], ["deploy"]):
        assert cli(*step, env=env).code == 0
    (deploy,) = [r for r in emulator.requests() if r["path"].endswith(":deployModel")]
    assert deploy["path"].startswith("/v1beta1/")
    assert deploy["body"]["deployedModel"]["dedicatedResources"].get("minReplicaCount", 0) == 0  # proto3 omits 0
    again = cli("deploy", env=env)
    assert again.code == 0 and "unchanged" in again.err
    assert cli("predict", "a fox", "-o", "fox.png", *SMALL, env=env).code == 0


def test_teardown_images_deletes_what_the_builds_pushed(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    env = emulator.env()
    for step in (["build"], ["upload"], ["deploy"], ["ui-deploy"]):
        assert cli(*step, env=env).code == 0
    assert len(emulator.resources()["packages"]) == 2
    (tmp_path / ".sdxlctl" / "state.json").unlink()  # names derive from the deployment: no state needed
    down = cli("teardown", "--yes", "--images", env=env)
    assert down.code == 0, down.err
    assert emulator.resources()["packages"] == []
    assert cli("teardown", "--yes", "--images", env=env).code == 0  # already gone counts as done


def test_status_asks_google_what_exists_now(cli: Cli, emulator: Emulator) -> None:
    import httpx

    env = emulator.env()
    for step in (["build"], ["upload"], ["deploy"]):
        assert cli(*step, env=env).code == 0
    states = {r["kind"]: r["state"] for r in json.loads(cli("status", "--json", env=env).out)["resources"]}
    assert states == {
        "server-image": "built",
        "model": "ready",
        "endpoint": "serving 1 model",
        "server-account": "ready",
    }
    (model,) = emulator.resources()["models"]
    (endpoint,) = emulator.resources()["endpoints"]
    undeploy_behind_sdxlctls_back(emulator, endpoint)
    httpx.delete(f"{emulator.url}/v1/{model['name']}").raise_for_status()
    states = {r["kind"]: r["state"] for r in json.loads(cli("status", "--json", env=env).out)["resources"]}
    assert states["endpoint"] == "no model" and states["model"] == "gone"


def undeploy_behind_sdxlctls_back(emulator: Emulator, endpoint: dict) -> None:
    """What someone with the console or gcloud would do: undeploy the endpoint's model, and wait it out."""
    import httpx

    httpx.post(
        f"{emulator.url}/v1/{endpoint['name']}:undeployModel",
        json={"deployedModelId": endpoint["deployedModels"][0]["id"]},
    ).raise_for_status()
    for _ in range(3):
        for operation in list(emulator.world.operations.values()):
            operation.poll()


def test_a_gone_endpoint_costs_nothing_more(cli: Cli, emulator: Emulator) -> None:
    """Deleted behind sdxlctl's back: no cost so far that keeps growing with the clock, nor an uptime."""
    import httpx

    env = emulator.env()
    for step in (["build"], ["upload"], ["deploy"]):
        assert cli(*step, env=env).code == 0
    (endpoint,) = emulator.resources()["endpoints"]
    undeploy_behind_sdxlctls_back(emulator, endpoint)
    httpx.delete(f"{emulator.url}/v1/{endpoint['name']}").raise_for_status()
    rows = {r["kind"]: r for r in json.loads(cli("status", "--json", env=env).out)["resources"]}
    assert rows["endpoint"]["state"] == "gone" and rows["endpoint"]["cost_so_far"] is None
    shown = cli("status", env=env | {"COLUMNS": "200"}).out
    rows_shown = [[cell.strip() for cell in line.strip("│").split("│")] for line in shown.splitlines() if "│" in line]
    (cells,) = [cells for cells in rows_shown if cells[0] == "endpoint"]
    assert cells[4] == "—", cells  # up for: unknown, not the age of the record
