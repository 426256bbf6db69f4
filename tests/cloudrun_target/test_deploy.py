"""`sdxlctl upload` and `deploy` on target cloudrun through the CLI, against the emulator; the service read back
with google-cloud-run's own ServicesClient."""

from __future__ import annotations

from typing import Any

import pytest

from sdxlctl.context import BAKED_FOLDER
from sdxlctl.state import StateStore
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, REGION, Emulator

SERVICE = f"projects/{PROJECT}/locations/{REGION}/services/sdxl-server"
SERVER_ACCOUNT = f"sdxl-server-sa@{PROJECT}.iam.gserviceaccount.com"
QUOTA_PAGE = "https://console.cloud.google.com/iam-admin/quotas?service=run.googleapis.com"


def _env(emulator: Emulator, **extra: str) -> dict[str, str]:
    return emulator.env(SDXLCTL_TARGET="cloudrun", **extra)


def _up(cli: Cli, env: dict[str, str], *steps: str) -> str:
    said = ""
    for step in steps:
        result = cli(step, env=env)
        assert result.code == 0, (step, result.err)
        said += result.err
    return said


def _client(emulator: Emulator) -> Any:
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import run_v2

    options = ClientOptions(api_endpoint=emulator.url)
    return run_v2.ServicesClient(credentials=AnonymousCredentials(), transport="rest", client_options=options)


def _service(emulator: Emulator) -> Any:
    return _client(emulator).get_service(name=SERVICE)


def _writes(emulator: Emulator, since: int = 0) -> list[tuple[str, str]]:
    return [(r["method"], r["path"]) for r in emulator.requests()[since:] if r["method"] != "GET"]


def test_deploy_creates_the_private_l4_service_with_every_field(cli: Cli, emulator: Emulator, tmp_path: Any) -> None:
    from google.cloud import run_v2

    said = _up(cli, _env(emulator), "build", "deploy")
    assert "create" in said and "USD per instance-hour" in said
    service = _service(emulator)
    assert service.labels == {"sdxlctl-deployment": "sdxl", "managed-by": "sdxlctl"}
    assert service.ingress == run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL
    assert service.invoker_iam_disabled is False
    assert service.scaling.min_instance_count == 0
    template = service.template
    assert template.service_account == SERVER_ACCOUNT  # its own, never the default compute account
    assert dict(template.labels) == dict(service.labels)
    assert (template.scaling.min_instance_count, template.scaling.max_instance_count) == (0, 1)
    assert template.max_instance_request_concurrency == 5  # queue_size 4 + the one generating
    assert template.timeout.total_seconds() == 600
    assert template.node_selector.accelerator == "nvidia-l4"
    assert template.gpu_zonal_redundancy_disabled is True
    assert template.execution_environment == run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN2
    (container,) = template.containers
    image = StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "server-image")
    assert image is not None and container.image == image.name
    assert [(p.name, p.container_port) for p in container.ports] == [("http1", 8080)]
    assert dict(container.resources.limits) == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert (container.resources.cpu_idle, container.resources.startup_cpu_boost) == (False, True)
    probe = container.startup_probe
    assert (probe.http_get.path, probe.http_get.port) == ("/health", 8080)
    assert (probe.period_seconds, probe.timeout_seconds, probe.failure_threshold) == (10, 5, 60)
    env = {e.name: e.value for e in container.env}
    assert env["SDXL_MAX_REQUEST_BYTES"] == env["SDXL_MAX_RESPONSE_BYTES"] == str(32 * 1024 * 1024)
    assert env["SDXL_TIME_LIMIT"] == "55.0" and env["SDXL_QUEUE_SIZE"] == "4" and env["SDXL_MODEL"] == "tiny"
    assert env["SDXL_COMPILE_CACHE"] == f"gs://{PROJECT}-sdxlctl/compile-cache/sdxl"  # as on Vertex AI
    policy = _client(emulator).get_iam_policy(request={"resource": SERVICE})
    assert not [b for b in policy.bindings if "allUsers" in b.members or "allAuthenticatedUsers" in b.members]
    assert SERVER_ACCOUNT in [a["email"] for a in emulator.resources()["accounts"]]
    assert emulator.bucket_roles(f"{PROJECT}-sdxlctl", f"serviceAccount:{SERVER_ACCOUNT}") == [
        "roles/storage.objectUser"
    ]
    recorded = StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "server-service")
    assert recorded is not None and (recorded.name, recorded.target, recorded.url) == (SERVICE, "cloudrun", service.uri)
    details = recorded.details
    assert details["revision"] == service.latest_ready_revision.rsplit("/", 1)[-1] and details["deployed_at"]
    assert {k: details[k] for k in ("gpu", "cpu", "memory_gib", "min_instances", "max_instances")} == {
        "gpu": "l4",
        "cpu": 8,
        "memory_gib": 32,
        "min_instances": 0,
        "max_instances": 1,
    }
    assert (details["zonal_redundancy"], details["timeout_s"], details["account"]) == (False, 600, SERVER_ACCOUNT)
    account = StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "server-account")
    assert account is not None and (account.name, account.target) == (SERVER_ACCOUNT, "cloudrun")


def test_the_same_config_again_sends_no_update(cli: Cli, emulator: Emulator) -> None:
    env = _env(emulator)
    _up(cli, env, "build", "deploy")
    before = len(emulator.requests())
    again = cli("deploy", env=env)
    assert again.code == 0 and "unchanged" in again.err, again.err
    assert _writes(emulator, before) == []
    plan = cli("deploy", "--dry-run", env=env)
    assert "unchanged" in plan.err and "Cloud Run service" in plan.err


def test_a_changed_cpu_updates_that_one_field(cli: Cli, emulator: Emulator) -> None:
    env = _env(emulator)
    _up(cli, env, "build", "deploy")
    first = _service(emulator)
    plan = cli("deploy", "--dry-run", env=_env(emulator, SDXLCTL_CLOUDRUN_CPU="4"))
    assert "update" in plan.err and "cpu 8 -> 4" in " ".join(plan.err.split()), plan.err
    before = len(emulator.requests())
    changed = cli("deploy", env=_env(emulator, SDXLCTL_CLOUDRUN_CPU="4"))
    assert changed.code == 0, changed.err
    assert "update" in changed.err and "cpu 8 -> 4" in " ".join(changed.err.split()), changed.err
    assert [w for w in _writes(emulator, before) if "/services" in w[1]] == [("PATCH", f"/v2/{SERVICE}")]
    after = _service(emulator)
    assert after.template.containers[0].resources.limits["cpu"] == "4"
    assert after.template.containers[0].resources.limits["memory"] == "32Gi"
    assert after.latest_ready_revision != first.latest_ready_revision
    assert len(emulator.resources()["services"]) == 1


def test_dry_run_calls_nothing_and_shows_the_plan_and_price(cli: Cli, emulator: Emulator) -> None:
    plan = cli("deploy", "--dry-run", env=_env(emulator))
    assert plan.code == 0, plan.err
    said = " ".join(plan.err.split())
    assert "create" in said and "sdxl-server" in said and SERVER_ACCOUNT in said
    assert "NVIDIA L4" in said and "8 vCPU, 32 GiB" in said and "GPU memory" in said
    # the facts sheet's worked example: L4 without zonal redundancy + 8 vCPU + 32 GiB
    assert "1.42 USD per instance-hour while up" in said and "0 USD while idle" in said, said
    kept = cli("deploy", "--dry-run", env=_env(emulator, SDXLCTL_CLOUDRUN_MIN_INSTANCES="1"))
    assert "34.10 USD/day idle (1 kept up)" in " ".join(kept.err.split()), kept.err
    assert emulator.requests() == []


def test_a_region_the_price_table_lacks_still_plans(cli: Cli, emulator: Emulator) -> None:
    plan = cli("deploy", "--dry-run", env=_env(emulator, SDXLCTL_GCP_REGION="asia-southeast1"))
    assert plan.code == 0, plan.err
    assert "no Cloud Run price in the table for asia-southeast1" in " ".join(plan.err.split())


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_another_gpu_is_refused_before_any_request(cli: Cli, emulator: Emulator, dry_run: list[str]) -> None:
    result = cli("deploy", "--gpu", "a100", *dry_run, env=_env(emulator))
    assert result.code == 2, result.err
    assert "--gpu a100" in result.err and "target vertex" in result.err
    assert emulator.requests() == []


def test_a_region_without_l4_is_refused_before_any_request(cli: Cli, emulator: Emulator) -> None:
    result = cli("deploy", env=_env(emulator, SDXLCTL_GCP_REGION="us-west1"))
    assert result.code == 2 and "us-west1" in result.err and "europe-west4" in result.err, result.err
    assert emulator.requests() == []


@pytest.mark.parametrize("zonal", [False, True])
def test_the_quota_refusal_names_the_quota_and_its_page(cli: Cli, emulator: Emulator, zonal: bool) -> None:
    from sdxlctl.gpus import CLOUD_RUN_GPU

    env = _env(emulator, SDXLCTL_CLOUDRUN_MAX_INSTANCES="4", SDXLCTL_CLOUDRUN_ZONAL_REDUNDANCY=str(zonal).lower())
    _up(cli, env, "build")
    result = cli("deploy", env=env)
    assert result.code == 1, result.err
    said = " ".join(result.err.split())
    assert CLOUD_RUN_GPU.quota(zonal) in said and QUOTA_PAGE in said and "max_instances" in said, said
    assert ("zonal_redundancy = false" in said) == zonal
    assert "Traceback" not in result.err
    assert emulator.resources().get("services", []) == []


def test_a_lost_create_answer_ends_with_one_service(cli: Cli, emulator: Emulator) -> None:
    env = _env(emulator)
    _up(cli, env, "build")
    emulator.fault(method="POST", path=r"/services$", answer="drop", after=True)
    deployed = cli("deploy", env=env)
    assert deployed.code == 0, deployed.err
    (service,) = emulator.resources()["services"]
    assert service["template"]["nodeSelector"] == {"accelerator": "nvidia-l4"}
    again = cli("deploy", env=env)
    assert again.code == 0 and "unchanged" in again.err


def test_a_dropped_create_is_sent_again(cli: Cli, emulator: Emulator) -> None:
    env = _env(emulator)
    _up(cli, env, "build")
    emulator.fault(method="POST", path=r"/services$", answer="drop")
    assert cli("deploy", env=env).code == 0
    assert len(emulator.resources()["services"]) == 1
    creates = [w for w in _writes(emulator) if w[0] == "POST" and w[1].endswith("/services")]
    assert len(creates) == 2


def test_upload_has_nothing_to_do_but_needs_the_image(cli: Cli, emulator: Emulator) -> None:
    env = _env(emulator)
    first = cli("upload", env=env)
    assert first.code == 1 and "sdxlctl build" in first.err
    _up(cli, env, "build")
    before = len(emulator.requests())
    uploaded = cli("upload", env=env)
    assert uploaded.code == 0 and "nothing to upload" in uploaded.err and "sdxlctl deploy" in uploaded.err
    assert len(emulator.requests()) == before
    plan = cli("upload", "--dry-run", env=env)
    assert plan.code == 0 and "nothing to upload" in plan.err


def test_gs_weights_are_read_where_they_are_by_the_servers_own_account(cli: Cli, emulator: Emulator) -> None:
    emulator.storage().create_bucket("weights")
    env = _env(emulator, SDXLCTL_MODEL_SOURCE="gs://weights/sdxl-base", SDXLCTL_MODEL_COMPILE_CACHE="none")
    _up(cli, env, "build", "deploy")
    env_vars = {e.name: e.value for e in _service(emulator).template.containers[0].env}
    assert env_vars["SDXL_MODEL"] == "gs://weights/sdxl-base"
    assert "SDXL_COMPILE_CACHE" not in env_vars
    assert emulator.bucket_roles("weights", f"serviceAccount:{SERVER_ACCOUNT}") == ["roles/storage.objectViewer"]


def test_an_image_without_the_baked_weights_is_refused(cli: Cli, emulator: Emulator) -> None:
    env = _env(emulator, SDXLCTL_MODEL_SOURCE="stabilityai/stable-diffusion-xl-base-1.0")
    _up(cli, env, "build")
    result = cli("deploy", env={**env, "SDXLCTL_MODEL_BAKE": "true"})
    assert result.code == 1 and "bake" in result.err and "sdxlctl build" in result.err, result.err
    assert emulator.resources().get("services", []) == []
    baked = {**env, "SDXLCTL_MODEL_BAKE": "true"}
    _up(cli, baked, "build", "deploy")
    env_vars = {e.name: e.value for e in _service(emulator).template.containers[0].env}
    assert (env_vars["SDXL_MODEL"], env_vars["SDXL_VAE"]) == (BAKED_FOLDER, "model")  # loaded from the image


def test_a_rollout_whose_polls_keep_failing_stays_recorded_and_the_rerun_waits_for_it(
    cli: Cli, emulator: Emulator, tmp_path: Any
) -> None:
    env = _env(emulator, SDXLCTL_GCP_RETRY_S="1")
    _up(cli, env, "build")
    emulator.fault(method="GET", path=r"/operations/", code=503, status="UNAVAILABLE", times=10_000)
    failed = cli("deploy", env=env)
    assert failed.code == 1 and "running the step again waits for it" in failed.err, failed.err
    recorded = StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "server-service")
    assert recorded is not None and recorded.name == SERVICE and recorded.details.get("operation")
    emulator.clear_faults()
    again = cli("deploy", env=env)
    assert again.code == 0 and "resumed the rollout" in again.err, again.err
    assert [w for w in _writes(emulator) if "/services" in w[1]] == [
        ("POST", f"/v2/projects/{PROJECT}/locations/{REGION}/services")
    ]
    recorded = StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "server-service")
    assert recorded is not None and not recorded.details.get("operation") and recorded.details["revision"]
    assert cli("deploy", env=env).err.count("unchanged") == 1


def test_a_service_whose_last_rollout_failed_is_tried_again(cli: Cli, emulator: Emulator) -> None:
    env = _env(emulator)
    _up(cli, env, "build", "deploy")
    with emulator.world.lock:  # as Cloud Run leaves a service whose revision failed to start: done, failed
        record = emulator.world.table("services")[SERVICE]
        record["terminalCondition"] = {"type": "Ready", "state": "CONDITION_FAILED", "message": "probe failed"}
    before = len(emulator.requests())
    again = cli("deploy", env=env)
    assert again.code == 0 and "last rollout failed (probe failed): tried again" in " ".join(again.err.split())
    (patch,) = [r for r in emulator.requests()[before:] if r["method"] == "PATCH"]
    assert patch["body"]["template"]["revision"].startswith("sdxl-server-r")
    assert _service(emulator).terminal_condition.state.name == "CONDITION_SUCCEEDED"
    assert "unchanged" in cli("deploy", env=env).err  # the revision's name is Cloud Run's business, not a change
    assert "unchanged" in cli("deploy", "--dry-run", env=env).err
