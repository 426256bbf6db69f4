"""LoRA on Vertex AI: the model server's account may read each gs:// prefix of [model] lora_sources and each
preloaded adapter's folder, and nothing beside them; the plan says so before anything is called; a prefix
dropped from the config loses its grant at the next deploy, and teardown takes them all away.

What a grant allows is decided from the bucket's policy for the requests the server's own LoRA store sends
(tests/cloud/gcs_access.py): the emulator enforces no IAM.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.cloud.gcs_access import Access, allowed, recording_proxy
from tests.cloud.test_least_privilege import up
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, Emulator

SERVER = f"serviceAccount:sdxl-server-sa@{PROJECT}.iam.gserviceaccount.com"
VIEWER = "roles/storage.objectViewer"


@pytest.fixture
def buckets(emulator: Emulator) -> tuple[str, str]:
    """Two buckets of this test's own with uniform bucket-level access (conditions need it)."""
    client = emulator.storage()
    made = []
    for kind in ("loras", "styles"):
        bucket = client.bucket(f"{kind}-{uuid.uuid4().hex[:12]}")
        bucket.iam_configuration.uniform_bucket_level_access_enabled = True
        client.create_bucket(bucket)
        made.append(bucket.name)
    return made[0], made[1]


def text(err: str) -> str:
    return re.sub(r"[\s│┃]+", " ", err)


def bindings(emulator: Emulator, bucket: str) -> list[dict[str, Any]]:
    """The server account's bindings on `bucket`: role and condition expression."""
    policy = emulator.storage().bucket(bucket).get_iam_policy(requested_policy_version=3)
    return sorted(
        (
            {"role": b["role"], "condition": (b.get("condition") or {}).get("expression")}
            for b in policy.bindings
            if SERVER in b["members"]
        ),
        key=lambda b: (b["role"], b["condition"] or ""),
    )


def policy_of(emulator: Emulator, bucket: str) -> dict[str, Any]:
    policy = emulator.storage().bucket(bucket).get_iam_policy(requested_policy_version=3)
    return {"bindings": [dict(b) for b in policy.bindings]}


def lora_env(emulator: Emulator, loras: str, styles: str, **extra: str) -> dict[str, str]:
    settings = {
        "SDXLCTL_MODEL_LORA_SOURCES": f"gs://{loras}/loras,hf://some-org/",
        # pixel lies under the allowed prefix (no second grant); ink is a folder of another bucket
        "SDXLCTL_MODEL_LORAS": f"pixel=gs://{loras}/loras/pixel.safetensors,ink=gs://{styles}/styles/ink/",
        "SDXLCTL_MODEL_COMPILE_CACHE": "none",  # no cache to write: LoRA alone calls for the server's account
    }
    return emulator.env(**{**settings, **extra})


def test_the_plan_lists_what_the_server_reads_and_with_which_access_and_calls_nothing(
    cli: Cli, emulator: Emulator
) -> None:
    env = lora_env(emulator, "team-loras", "team-styles")
    plan = cli("deploy", "--dry-run", env=env)
    assert plan.code == 0, plan.err
    said = text(plan.err)
    assert f"create service account {SERVER.split(':')[1]}" in said
    assert f"{VIEWER} on its LoRA folders gs://team-loras/loras/ only, gs://team-styles/styles/ink/ only" in said
    assert (
        f"read LoRA gs://team-loras/loras/ adapters requests name under it, read as the server's account, {VIEWER}"
        in (said)
    )
    assert "read LoRA hf://some-org/ adapters requests name under it, fetched from the Hub, at request time" in said
    assert f"load LoRA ink = gs://team-styles/styles/ink/ read as the server's account, {VIEWER} on" in said
    assert "check LoRA max rank 64" in said
    as_json = cli("deploy", "--dry-run", "--json", env=env)
    rows = [c for c in json.loads(as_json.out)["changes"] if c["kind"] == "LoRA"]
    assert [r["name"] for r in rows] == [
        "gs://team-loras/loras/",
        "hf://some-org/",
        "pixel = gs://team-loras/loras/pixel.safetensors",
        "ink = gs://team-styles/styles/ink/",
        "max rank 64",
    ]
    assert emulator.requests() == []
    # Hub prefixes alone need no account: Vertex AI's own runs the server, nothing is granted.
    hub = cli(
        "deploy", "--dry-run", env={**env, "SDXLCTL_MODEL_LORA_SOURCES": "hf://some-org/", "SDXLCTL_MODEL_LORAS": ""}
    )
    assert hub.code == 0 and "service account" not in text(hub.err) and "fetched from the Hub" in text(hub.err)


def server_fetches(emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, uri: str) -> list[Access]:
    """What the model server's LoRA store asks of Cloud Storage to fetch `uri` (metadata, then the bytes)."""
    import numpy as np
    from safetensors.numpy import save

    from sdxl_server.lora.sources import parse_source
    from sdxl_server.lora.store import Store

    source = parse_source(uri)  # a folder's file: its pytorch_lora_weights.safetensors
    tensors = save({"x": np.zeros(4, dtype=np.float16)})
    emulator.storage().bucket(source.location).blob(source.path).upload_from_string(tensors)
    with recording_proxy(emulator.gcs_url) as (url, seen):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        store = Store(tmp_path / "loras", max_bytes=1_000_000, budget_bytes=10_000_000)
        fetched = store.fetch(source, field="parameters.lora[0].source")
    assert fetched.path.is_file() and {a.permission for a in seen} == {"storage.objects.get"}
    return seen


def test_the_server_may_read_its_lora_folders_and_nothing_beside_them_and_teardown_takes_that_away(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, buckets: tuple[str, str]
) -> None:
    loras, styles = buckets
    env = lora_env(emulator, loras, styles)
    up(cli, env, "build", "upload", "deploy")
    (model,) = emulator.resources()["models"]
    spec = {e["name"]: e["value"] for e in model["containerSpec"]["env"]}
    assert spec["SDXL_LORA_SOURCES"] == f"gs://{loras}/loras/,hf://some-org/"
    assert spec["SDXL_LORAS"] == f"pixel=gs://{loras}/loras/pixel.safetensors,ink=gs://{styles}/styles/ink/"
    (endpoint,) = emulator.resources()["endpoints"]
    assert endpoint["deployedModels"][0]["serviceAccount"] == SERVER.split(":")[1]
    # One binding each: the preloaded pixel lies under the allowed prefix, which covers it.
    (mine,) = bindings(emulator, loras)
    assert mine["role"] == VIEWER and 'objects/loras/")' in mine["condition"]
    (theirs,) = bindings(emulator, styles)
    assert theirs["role"] == VIEWER and 'objects/styles/ink/")' in theirs["condition"]

    policy = policy_of(emulator, loras)
    for uri in (f"gs://{loras}/loras/pixel.safetensors", f"gs://{loras}/loras/team/x.safetensors"):
        for request in server_fetches(emulator, monkeypatch, tmp_path / uri.rsplit("/", 1)[1], uri):
            assert allowed(policy, SERVER, request), request
    ink = server_fetches(emulator, monkeypatch, tmp_path / "ink", f"gs://{styles}/styles/ink/")
    assert all(allowed(policy_of(emulator, styles), SERVER, request) for request in ink)
    for bucket, name in (
        (loras, "loras-evil/x.safetensors"),  # beside the prefix, on no segment boundary
        (loras, "pixel.safetensors"),
        (loras, "source/sdxl-server-0a1b.tgz"),
        (styles, "styles/other.safetensors"),
        (styles, "styles/ink-2/pytorch_lora_weights.safetensors"),
    ):
        outside = Access("storage.objects.get", f"projects/_/buckets/{bucket}/objects/{name}")
        assert not allowed(policy_of(emulator, bucket), SERVER, outside), outside

    again = cli("deploy", env=env)  # nothing to change: no policy is written again
    assert again.code == 0 and f"keep service account {SERVER.split(':')[1]}" in text(again.err), again.err

    assert cli("teardown", "--yes", env=env).code == 0
    assert bindings(emulator, loras) == [] and bindings(emulator, styles) == []


def test_a_folder_dropped_from_the_config_loses_its_grant_and_teardown_finds_the_rest_in_the_state(
    cli: Cli, emulator: Emulator, buckets: tuple[str, str]
) -> None:
    loras, styles = buckets
    up(cli, lora_env(emulator, loras, styles), "build", "upload", "deploy")
    narrower = lora_env(emulator, loras, styles, SDXLCTL_MODEL_LORAS=f"pixel=gs://{loras}/loras/pixel.safetensors")
    said = text(up(cli, narrower, "upload", "deploy"))
    assert f"update bucket gs://{styles} the model server's roles taken away: unused now" in said
    assert bindings(emulator, styles) == [] and len(bindings(emulator, loras)) == 1

    # Teardown with a config that names no LoRA at all still revokes what the state says was granted.
    forgetful = emulator.env(SDXLCTL_MODEL_COMPILE_CACHE="none")
    assert cli("teardown", "--yes", env=forgetful).code == 0
    assert bindings(emulator, loras) == []


def test_folders_of_one_bucket_are_each_kept_a_grant_of_their_own(
    cli: Cli, emulator: Emulator, buckets: tuple[str, str]
) -> None:
    """Base weights, refiner and LoRA prefixes in one bucket: a second folder's grant took the first one's place
    (the base's weights became unreadable to the server that loads them)."""
    shared, _ = buckets
    env = emulator.env(
        SDXLCTL_MODEL_SOURCE=f"gs://{shared}/sdxl-base",
        SDXLCTL_MODEL_REFINER=f"gs://{shared}/sdxl-refiner",
        SDXLCTL_MODEL_LORA_SOURCES=f"gs://{shared}/loras/,gs://{shared}/loras/team/",
        SDXLCTL_MODEL_COMPILE_CACHE="none",
        SDXLCTL_MODEL_DTYPE="fp16",
    )
    up(cli, env, "build", "upload", "deploy")
    folders = sorted(re.findall(r'objects/([^"]*)"', b["condition"])[0] for b in bindings(emulator, shared))
    assert folders == ["loras/", "sdxl-base/", "sdxl-refiner/"]  # loras/team/ lies in loras/: no grant of its own
    again = cli("deploy", env=env)  # nothing to change: no policy is written again
    assert again.code == 0 and f"keep service account {SERVER.split(':')[1]}" in text(again.err), again.err
    assert cli("teardown", "--yes", env=env).code == 0
    assert bindings(emulator, shared) == []


def test_the_plan_names_the_base_weights_the_server_reads_itself_once_lora_gives_it_an_account(
    cli: Cli, emulator: Emulator
) -> None:
    """gs:// weights were the Model's artifact, read by Vertex AI's account; with the server's own account (here
    for LoRA alone) the server reads them itself, and deploy grants that: the plan says so too."""
    env = lora_env(emulator, "team-loras", "team-styles", SDXLCTL_MODEL_SOURCE="gs://team-weights/sdxl-base")
    plan = cli("deploy", "--dry-run", env={**env, "SDXLCTL_MODEL_DTYPE": "fp16"})
    assert plan.code == 0, plan.err
    assert f"{VIEWER} on its weights gs://team-weights/sdxl-base/ only" in text(plan.err)


def test_a_preloaded_object_at_a_buckets_top_is_granted_alone_not_the_bucket(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, buckets: tuple[str, str]
) -> None:
    """gs://b/x.safetensors has no folder: its folder's grant was all of the bucket. The server only reads that
    object (its metadata, then its bytes; no listing), so the grant names that object and nothing else."""
    loras, styles = buckets
    env = lora_env(emulator, loras, styles, SDXLCTL_MODEL_LORAS=f"top=gs://{styles}/top.safetensors")
    plan = text(cli("deploy", "--dry-run", env=env).err)
    assert f"on its LoRA folders gs://{loras}/loras/ only, gs://{styles}/top.safetensors only" in plan
    assert f"load LoRA top = gs://{styles}/top.safetensors read as the server's account, {VIEWER} on gs://" in plan
    assert "all of gs://" not in plan

    up(cli, env, "build", "upload", "deploy")
    (only,) = bindings(emulator, styles)
    assert only == {
        "role": VIEWER,
        "condition": f'resource.name == "projects/_/buckets/{styles}/objects/top.safetensors"',
    }
    fetched = server_fetches(emulator, monkeypatch, tmp_path / "top", f"gs://{styles}/top.safetensors")
    assert all(allowed(policy_of(emulator, styles), SERVER, request) for request in fetched)
    for outside in (
        Access("storage.objects.get", f"projects/_/buckets/{styles}/objects/other.safetensors"),
        Access("storage.objects.get", f"projects/_/buckets/{styles}/objects/top.safetensors.old"),
        Access("storage.objects.get", f"projects/_/buckets/{styles}/objects/top.safetensors/x.safetensors"),
        Access("storage.objects.list", f"projects/_/buckets/{styles}", "top"),
    ):
        assert not allowed(policy_of(emulator, styles), SERVER, outside), outside
    assert cli("teardown", "--yes", env=env).code == 0
    assert bindings(emulator, styles) == []
