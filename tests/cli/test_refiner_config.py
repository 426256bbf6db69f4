"""[model] refiner: validated like the other keys, the server's SDXL_REFINER on both targets, in the deploy plan
(the refiner, the GPU memory against the GPU's), and a gs:// refiner's read access on Vertex AI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxlctl.config import Config, load_config
from sdxlctl.errors import ConfigError
from sdxlctl.local import processes as local
from sdxlctl.vertex.names import container_env
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, Emulator

REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
BASE = "stabilityai/stable-diffusion-xl-base-1.0"
ACCOUNT = f"serviceAccount:sdxl-server-sa@{PROJECT}.iam.gserviceaccount.com"


def config(**model: object) -> Config:
    return Config.model_validate({"gcp": {"project": "p"}, "model": {"source": BASE, **model}})


def test_the_refiner_is_off_unless_asked_and_its_spellings_are_kept_as_the_server_reads_them() -> None:
    assert Config().model.refiner == "off"
    assert config(refiner=" Random ").model.refiner == "random"
    assert config(refiner="gs://team/refiner/").model.refiner == "gs://team/refiner"
    assert config(refiner=REFINER).model.refiner == REFINER  # a repo id keeps its case
    assert load_config(None, {"SDXLCTL_MODEL_REFINER": "tiny"}).model.refiner == "tiny"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "expected off, tiny, random"),
        ("gs://", "a Hub repo id, a folder, or gs://bucket/folder"),
        ("gs:///refiner", "a Hub repo id, a folder, or gs://bucket/folder"),
        ("random-sdxl", "random-sdxl is the base's"),
    ],
)
def test_a_bad_refiner_names_the_variable_and_what_it_takes(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"SDXLCTL_MODEL_REFINER": value, "SDXLCTL_MODEL_SOURCE": BASE})
    assert "SDXLCTL_MODEL_REFINER (environment)" in caught.value.message and says in caught.value.message


def test_a_refiner_of_the_other_size_than_the_base_is_refused_before_anything_starts(tmp_path: Path) -> None:
    file = tmp_path / "sdxlctl.toml"
    file.write_text('[model]\nsource = "random-sdxl"\nrefiner = "tiny"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(file, {})
    assert f"{file}: [model] refiner = 'tiny' does not fit source = 'random-sdxl'" in caught.value.message
    for refiner in ("random", REFINER):  # the default base is the tiny one
        with pytest.raises(ConfigError, match="cannot share the tiny base"):
            load_config(None, {"SDXLCTL_MODEL_REFINER": refiner})
    # Either size may sit in a folder or a bucket: the server tells when it loads them.
    assert load_config(None, {"SDXLCTL_MODEL_REFINER": "gs://b/tiny-refiner"}).model.refiner == "gs://b/tiny-refiner"
    assert load_config(None, {"SDXLCTL_MODEL_REFINER": "tiny"}).model.refiner == "tiny"


def test_sdxlctl_config_shows_the_refiner_and_where_it_came_from(cli: Cli) -> None:
    shown = cli("config", "--json", env={"SDXLCTL_MODEL_REFINER": "tiny"})
    assert shown.code == 0, shown.err
    (row,) = [r for r in json.loads(shown.out)["settings"] if r["key"] == "model.refiner"]
    assert row == {"key": "model.refiner", "value": "tiny", "source": "SDXLCTL_MODEL_REFINER", "env": row["env"]}
    bad = cli("config", env={"SDXLCTL_MODEL_REFINER": "gs://"})
    assert bad.code == 2 and "SDXLCTL_MODEL_REFINER" in bad.err and "Traceback" not in bad.err


def test_both_targets_tell_the_server_the_refiner_and_a_baked_image_still_fetches_it() -> None:
    for refined in (config(refiner=REFINER), config(refiner="gs://team/refiner", bake=True)):
        assert local.server_spec(refined).env["SDXL_REFINER"] == refined.model.refiner
        assert container_env(refined)["SDXL_REFINER"] == refined.model.refiner
    baked = container_env(config(refiner=REFINER, bake=True))
    assert baked["SDXL_MODEL"] == "/models/sdxl" and baked["SDXL_REFINER"] == REFINER  # only the base is baked
    # Off is the server's default: a deployment without a refiner keeps the container spec it had.
    assert "SDXL_REFINER" not in local.server_spec(config()).env and "SDXL_REFINER" not in container_env(config())


def test_the_deploy_plan_shows_the_refiner_and_the_gpu_memory_and_sends_nothing(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env(SDXLCTL_MODEL_SOURCE="random-sdxl", SDXLCTL_MODEL_REFINER="random", SDXLCTL_MODEL_BAKE="false")
    plan = cli("deploy", "--gpu", "l4", "--dry-run", env=env)
    assert plan.code == 0, plan.err
    said = " ".join(plan.err.split())
    assert "load refiner random fetched by the server at every start" in said
    assert "check GPU memory l4 ~11.5 GB weights (base 6.9 + refiner 4.5, fp16) + ~3 GB working" in said
    assert "of 24 GB on L4" in said
    tight = " ".join(cli("deploy", "--gpu", "t4", "--dry-run", env=env).err.split())
    assert "warn GPU memory t4" in tight and "~14.5 GB is over 90% of the 16 GB of the T4" in tight
    as_json = cli("deploy", "--dry-run", "--json", env=env)
    cost = json.loads(as_json.out)["cost"]
    assert cost["gpu_memory"]["verdict"] == "fits" and cost["gpu_memory"]["refiner_gb"] == pytest.approx(4.52)
    assert cost["refiner"]["expert_ensemble"]["refiner_steps"] == 7  # as the server splits 30 steps
    assert emulator.requests() == []


def test_the_local_dry_run_names_the_refiner_too(cli: Cli) -> None:
    plain = cli("deploy", "--dry-run")
    assert plain.code == 0 and "refiner" not in plain.out + plain.err
    refined = cli("deploy", "--dry-run", env={"SDXLCTL_MODEL_REFINER": "tiny"})
    assert refined.code == 0, refined.err
    assert "with model 'tiny' and refiner 'tiny' on 127.0.0.1" in " ".join((refined.out + refined.err).split())


def test_weights_that_cannot_fit_the_gpu_are_refused_before_any_call(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env(SDXLCTL_MODEL_SOURCE="random-sdxl", SDXLCTL_MODEL_REFINER="random", SDXLCTL_MODEL_DTYPE="fp32")
    for args in (["deploy", "--gpu", "t4", "--dry-run"], ["deploy", "--gpu", "t4"]):
        refused = cli(*args, env=env)
        assert refused.code == 1, refused.err
        said = " ".join(refused.err.split())
        assert "~22.9 GB weights (base 13.9 + refiner 9.0, fp32)" in said and "dtype fp16" in said
        assert "[model] refiner = off" in said and "Traceback" not in said
    assert emulator.requests() == []
    # fp32 without the refiner loads, though the estimate says it may run out: a warning, not a refusal.
    plan = cli("deploy", "--gpu", "t4", "--dry-run", env={**env, "SDXLCTL_MODEL_REFINER": "off"})
    assert plan.code == 0 and "will likely run out of memory" in " ".join(plan.err.split())


def test_a_gs_refiner_is_read_as_the_servers_own_account_and_teardown_takes_that_away(
    cli: Cli, emulator: Emulator
) -> None:
    """Vertex AI's own account reads only the Model's artifact (the base): the refiner needs an account."""
    emulator.storage().create_bucket("team-refiner")
    env = emulator.env(
        SDXLCTL_MODEL_SOURCE="random-sdxl",
        SDXLCTL_MODEL_REFINER="gs://team-refiner/sdxl-refiner",
        SDXLCTL_MODEL_COMPILE_CACHE="none",  # no cache to write: the refiner alone calls for the account
    )
    plan = " ".join(cli("deploy", "--dry-run", env=env).err.split())
    assert "roles/storage.objectViewer on its refiner gs://team-refiner/sdxl-refiner/ only" in plan
    assert "compile cache" not in plan
    for step in ("build", "upload", "deploy"):
        result = cli(step, env=env)
        assert result.code == 0, (step, result.err)
    (model,) = emulator.resources()["models"]
    assert {e["name"]: e["value"] for e in model["containerSpec"]["env"]}["SDXL_REFINER"] == (
        "gs://team-refiner/sdxl-refiner"
    )
    (endpoint,) = emulator.resources()["endpoints"]
    assert endpoint["deployedModels"][0]["serviceAccount"] == ACCOUNT.split(":")[1]
    assert emulator.bucket_roles("team-refiner", ACCOUNT) == ["roles/storage.objectViewer"]

    assert cli("teardown", "--yes", env=env).code == 0
    assert emulator.bucket_roles("team-refiner", ACCOUNT) == []
