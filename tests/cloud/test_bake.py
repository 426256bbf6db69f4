"""[model] bake = true: the build fetches the weights into the image, so a replica downloads nothing.

Against the emulators with the real clients: the Cloud Build emulator runs each step in order (docker builds
checked against their context, the fetch step's folder and SOURCE.json written as fetch.py writes them) and
records the labels of what it pushes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sdxlctl.config import load_config
from sdxlctl.errors import ConfigError
from sdxlctl.state import StateStore
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator

HUB = "stabilityai/stable-diffusion-xl-base-1.0"
FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"
WEIGHTS_BUCKET = "published-weights"


def baked(emulator: Emulator, source: str = HUB, **extra: str) -> dict[str, str]:
    return emulator.env(SDXLCTL_MODEL_SOURCE=source, SDXLCTL_MODEL_BAKE="true", **extra)


def builds(emulator: Emulator) -> list[Any]:
    """Every build of the project, read back with google-cloud-build (newest first)."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.devtools import cloudbuild_v1

    client = cloudbuild_v1.CloudBuildClient(
        credentials=AnonymousCredentials(), transport="rest", client_options=ClientOptions(api_endpoint=emulator.url)
    )
    return list(client.list_builds(project_id="demo-project"))


def labels_of(emulator: Emulator, image: str) -> dict[str, str]:
    """The config labels of the pushed image tagged `image`, as the registry holds them."""
    tag = image.rsplit(":", 1)[1]
    (found,) = [i for i in emulator.resources()["dockerImages"] if tag in i["tags"]]
    return dict(found["config"]["Labels"])


def plan(env: dict[str, str], tmp_path: Path) -> tuple[str, str]:
    """What `build --dry-run` would say: the image, and the plan's detail (unwrapped by no table)."""
    from sdxlctl.vertex.images import plan_build

    result = plan_build(load_config(environ=env), StateStore(tmp_path / ".sdxlctl"))
    (change,) = result.changes
    return result.result, change.detail


def published_folder(emulator: Emulator, folder: str = "sdxl") -> str:
    """A gs:// folder with the published model_index.json (what the fetch step reads first)."""
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        **{c: ["transformers", "CLIPTextModel"] for c in ("text_encoder", "text_encoder_2")},
        **{c: ["transformers", "CLIPTokenizer"] for c in ("tokenizer", "tokenizer_2")},
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    client = emulator.storage()
    bucket = client.bucket(WEIGHTS_BUCKET)
    if not bucket.exists():
        bucket = client.create_bucket(WEIGHTS_BUCKET)
    bucket.blob(f"{folder}/model_index.json").upload_from_string(json.dumps(index))
    return f"gs://{WEIGHTS_BUCKET}/{folder}"


def test_a_baked_build_fetches_the_hub_weights_in_a_step_and_labels_the_image(cli: Cli, emulator: Emulator) -> None:
    built = cli("build", env=baked(emulator))
    assert built.code == 0, built.err
    image = built.out.strip()
    (build,) = builds(emulator)
    assert build.status.name == "SUCCESS" and image in build.images
    steps = {step.id: step for step in build.steps}
    base = steps["image"].args[steps["image"].args.index("-t") + 1]
    fetch = steps["fetch-weights"]
    assert fetch.name == base  # the fetch runs in the server image built the step before
    assert list(fetch.args) == ["-m", "sdxl_server.fetch", "--model", HUB, "--vae", FP16_FIX, "weights/sdxl"]
    assert "Dockerfile.bake" in steps["bake"].args and image in steps["bake"].args
    assert f"weights-{image.rsplit('-weights-', 1)[1]}" in build.tags

    labels = labels_of(emulator, image)
    assert labels["sdxlctl.weights.source"] == HUB and labels["sdxlctl.weights.vae"] == FP16_FIX
    assert labels["sdxlctl.weights.build"] == build.id  # Cloud Build's $BUILD_ID, substituted
    assert labels["sdxlctl.weights.record"] == "/models/sdxl/SOURCE.json"
    log = emulator.storage().bucket("demo-project-sdxlctl").blob(f"cloudbuild-logs/log-{build.id}.txt")
    assert f"fetch: copied 8 files (fp16 weights, VAE {FP16_FIX}) from {HUB}" in log.download_as_text()

    uploaded = cli("upload", env=baked(emulator))
    assert uploaded.code == 0, uploaded.err
    (model,) = emulator.resources()["models"]
    env = {e["name"]: e["value"] for e in model["containerSpec"]["env"]}
    assert model["containerSpec"]["imageUri"] == image
    assert (env["SDXL_MODEL"], env["SDXL_VAE"]) == ("/models/sdxl", "model")
    assert not model.get("artifactUri")


def test_a_gs_source_is_baked_and_served_from_the_image_without_artifact_or_weights_grant(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    source = published_folder(emulator)
    env = baked(emulator, source)
    assert "roles/storage.objectViewer on " + source in plan(env, tmp_path)[1]  # Cloud Build's account reads it
    for step in (["build"], ["upload"], ["deploy"]):
        result = cli(*step, env=env)
        assert result.code == 0, (step, result.err)
    (model,) = emulator.resources()["models"]
    env_vars = {e["name"]: e["value"] for e in model["containerSpec"]["env"]}
    assert env_vars["SDXL_MODEL"] == "/models/sdxl" and not model.get("artifactUri")
    server = "serviceAccount:sdxl-server-sa@demo-project.iam.gserviceaccount.com"
    assert emulator.bucket_roles(WEIGHTS_BUCKET, server) == []  # nothing to read there at run time
    (build,) = builds(emulator)
    fetch = list(build.steps[2].args)
    assert fetch[fetch.index("--model") + 1] == source
    assert fetch[fetch.index("--vae") + 1] == "model"  # auto, for a folder: its own VAE, as the server would
    labels = labels_of(emulator, build.images[-1])
    assert (labels["sdxlctl.weights.source"], labels["sdxlctl.weights.vae"]) == (source, "model")


def test_a_fetch_that_fails_fails_the_build_and_records_no_image(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    published_folder(emulator)  # the bucket exists, the folder does not
    result = cli("build", env=baked(emulator, f"gs://{WEIGHTS_BUCKET}/no-such-folder"))
    assert result.code != 0
    assert 'build step 2 "' in result.err and "failed" in result.err
    assert "has no model_index.json" in result.err  # the step's own line, from the log sdxlctl shows
    assert "packages" not in emulator.resources() or emulator.resources()["packages"] == []
    assert StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "server-image") is None


def test_baked_and_plain_images_differ_and_the_plain_one_reuses_the_baked_builds_base(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    plain_env = emulator.env(SDXLCTL_MODEL_SOURCE=HUB, SDXLCTL_MODEL_BAKE="false")
    baked_image = cli("build", env=baked(emulator)).out.strip()
    for other in (baked(emulator, "other/sdxl-finetune"), baked(emulator, SDXLCTL_MODEL_VAE="model")):
        image = plan(other, tmp_path)[0]
        assert image != baked_image and "-weights-" in image
    again = cli("build", env=baked(emulator))
    assert again.code == 0 and "unchanged" in again.err and again.out.strip() == baked_image

    plain = cli("build", env=plain_env)
    assert plain.code == 0, plain.err
    assert plain.out.strip() == baked_image.split("-weights-")[0]
    assert "built by" in plain.err and len(builds(emulator)) == 1  # the baked build pushed it already


def test_a_baked_build_whose_answer_was_lost_is_found_not_started_again(cli: Cli, emulator: Emulator) -> None:
    assert cli("build", env=emulator.env(SDXLCTL_MODEL_SOURCE=HUB)).code == 0  # same context, not baked
    emulator.fault(method="POST", path=r"/builds$", after=True, answer="error", code=500, status="INTERNAL")
    done = cli("build", env=baked(emulator))
    assert done.code == 0, done.err
    posts = [r for r in emulator.requests() if r["method"] == "POST" and r["path"].endswith("/builds")]
    assert len(posts) == 2 and len(builds(emulator)) == 2  # the plain one, and the baked one adopted
    assert "-weights-" in done.out and done.out.strip() in builds(emulator)[0].images


def test_upload_with_bake_refuses_an_image_without_those_weights(cli: Cli, emulator: Emulator) -> None:
    assert cli("build", env=emulator.env(SDXLCTL_MODEL_SOURCE=HUB)).code == 0
    result = cli("upload", env=baked(emulator))
    assert result.code != 0
    assert "[model] bake = true" in result.err and "no weights baked in" in result.err
    assert "sdxlctl build" in result.err
    assert "models" not in emulator.resources() or emulator.resources()["models"] == []


def test_build_dry_run_plans_the_bake_and_sends_nothing(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    result = cli("build", "--dry-run", env=baked(emulator))
    assert result.code == 0, result.err
    assert "nothing was called" in result.err and emulator.requests() == []
    image, detail = plan(baked(emulator), tmp_path)
    assert "-weights-" in image
    assert f"fetches {HUB} (VAE {FP16_FIX}) into /models/sdxl" in detail


@pytest.mark.parametrize("source", ["tiny", "random-sdxl", "FOLDER"])
def test_bake_without_weights_to_fetch_is_a_config_error_naming_it(source: str, tmp_path: Path) -> None:
    source = str(tmp_path) if source == "FOLDER" else source
    with pytest.raises(ConfigError) as raised:
        load_config(environ={"SDXLCTL_MODEL_SOURCE": source, "SDXLCTL_MODEL_BAKE": "true"})
    message = str(raised.value)
    assert "[model] bake = true" in message and "SDXLCTL_MODEL_BAKE" in message and repr(source) in message
    assert "gs://" in (raised.value.hint or "")


def test_bake_in_the_config_file_is_named_by_file_and_fails_the_command(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "sdxlctl.toml").write_text('target = "vertex"\n[model]\nbake = true\n')
    result = cli("build", "--dry-run")
    assert result.code == 2, result.err
    assert "sdxlctl.toml: [model] bake = true needs [model] source" in result.err
    assert "Traceback" not in result.err


def test_bake_is_off_by_default_and_a_hub_or_gs_source_may_be_baked() -> None:
    assert load_config(environ={}).model.bake is False
    for source in (HUB, "gs://bucket/sdxl"):
        config = load_config(environ={"SDXLCTL_MODEL_SOURCE": source, "SDXLCTL_MODEL_BAKE": "true"})
        assert config.model.bake is True


def test_the_emulator_fails_a_fetch_into_a_folder_the_images_user_may_not_write(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the bake has a root step first: the server image runs as `app`, and /workspace belongs to root."""
    from sdxlctl.context import Bake, container_folder, pack
    from sdxlctl.gcp.build import Builds, bake_steps
    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.gcp.storage import Storage
    from sdxlctl.vertex.names import cloud, names

    env = baked(emulator)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", env["STORAGE_EMULATOR_HOST"])
    config = load_config(environ=env)
    c, n = cloud(config), names(config)
    storage = Storage(c, n.bucket, n.labels)
    storage.ensure_bucket()
    source = storage.upload("source/model.tgz", pack(container_folder("model")).tarball)
    steps = [
        s
        for s in bake_steps(n.image("server", "base"), n.image("server", "baked"), Bake(HUB))
        if s.id != "weights-folder"
    ]
    lines: list[str] = []
    with pytest.raises(CloudError) as raised:
        Builds(c).run(
            source=source,
            image=n.image("server", "baked"),
            steps=steps,
            tags=["sdxlctl"],
            logs=storage,
            logs_prefix="cloudbuild-logs",
            progress=lambda _: None,
            on_log=lines.append,
        )
    assert 'build step 1 "' in str(raised.value) and "FAILURE" in str(raised.value)
    assert "Permission denied: '/workspace/weights/sdxl'" in "\n".join(lines)


def test_cost_counts_the_baked_weights_in_storage_and_says_what_baking_changes(cli: Cli) -> None:
    from sdxlctl.pricing import DAYS_PER_MONTH, bundled

    plain = cli("cost", "--json", "--days", "30", env={"SDXLCTL_MODEL_SOURCE": HUB, "SDXLCTL_MODEL_BAKE": "false"})
    bake = {"SDXLCTL_MODEL_SOURCE": HUB, "SDXLCTL_MODEL_BAKE": "true"}
    baked_cost = cli("cost", "--json", "--days", "30", env=bake)
    assert plain.code == 0 and baked_cost.code == 0, baked_cost.err
    before, after = json.loads(plain.out), json.loads(baked_cost.out)
    registry = bundled().artifact_registry
    weights = registry["baked_weights_gb"] * registry["usd_per_gb_month"] * 30 / DAYS_PER_MONTH
    assert after["usd"]["storage"] == pytest.approx(before["usd"]["storage"] + weights, abs=0.01)
    assert before["notes"] == []
    (note,) = after["notes"]
    assert "about 7 GB larger" in note and "image pull" in note and "each build downloads the weights" in note
    assert "not measured here" in note  # the size's source, said
    text = cli("cost", env=bake)
    assert "[model] bake: the server image is about 7 GB larger" in " ".join(text.err.split())
