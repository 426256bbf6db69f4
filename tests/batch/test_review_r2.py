"""Review of issue 18 (R2): never two jobs for one file, --attach only to this deployment's jobs, a wait whose
polls fail says the job goes on, collection reads only under the job's own raw/ folder, teardown touches only
jobs labelled with this deployment's exact name. Against the emulator, through the real client libraries."""

from __future__ import annotations

from typing import Any

import pytest

from sdxlctl.batch import Counts
from sdxlctl.errors import DeployError, Interrupted, SdxlctlError
from sdxlctl.vertex import batch as vertex_batch
from sdxlctl.vertex.names import cloud
from tests.batch.test_vertex_attach import creates
from tests.batch.test_vertex_run import BUCKET, make_batch, out, submission, uploaded
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator


def interrupt_when_running(counts: Counts) -> None:
    if counts.state == "RUNNING":
        raise KeyboardInterrupt


def foreign_job(emulator: Emulator, config: Any, store: Any, deployment: str) -> dict[str, Any]:
    """A job labelled as another deployment's, on this project's model (held RUNNING by the test)."""
    from sdxlctl.gcp.batch import Jobs

    model = store.read().get(config.name, "model").name
    folder = out().removeprefix(f"gs://{BUCKET}/")
    emulator.storage().bucket(BUCKET).blob(folder + "input.jsonl").upload_from_string(make_batch(1).jsonl())
    body = vertex_batch.job_body(
        config, submission(make_batch(1)), model, "20260101-000000", input_uri=out() + "input.jsonl", account=""
    )
    body["labels"]["sdxlctl-deployment"] = deployment
    return Jobs(cloud(config)).create(body, find_labels={"sdxlctl-deployment": deployment})


def test_a_rerun_while_the_files_job_runs_is_refused_naming_attach(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    emulator.slow("batchPredictionJobs")
    with pytest.raises(Interrupted):
        vertex_batch.run(config, store, submission(make_batch(2)), progress=interrupt_when_running)
    (job,) = emulator.batch_jobs()
    with pytest.raises(DeployError, match=r"still RUNNING on prompts\.txt") as refused:
        vertex_batch.run(config, store, submission(make_batch(2)))
    assert f"--attach --job {job['name'].rsplit('/', 1)[-1]}" in str(refused.value.hint)
    # its record lost: the job is found by its label and its display name
    for kind in [k for k in store.read().of("sdxl") if k.startswith("batch-")]:
        store.forget("sdxl", kind)
    with pytest.raises(DeployError, match="not starting a second one"):
        vertex_batch.run(config, store, submission(make_batch(2)))
    assert creates(emulator) == 1
    emulator.finish_batch_jobs()


def test_attach_refuses_another_deployments_job_and_another_projects(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    emulator.slow("batchPredictionJobs")
    other = foreign_job(emulator, config, store, "sdxl-other")
    gets = len(emulator.requests())
    with pytest.raises(DeployError, match=r"not a batch job of deployment sdxl .*sdxl-other"):
        vertex_batch.attach(config, store, other["name"].rsplit("/", 1)[-1])
    assert not [r for r in emulator.requests()[gets:] if "/o" in r["path"] or r["method"] != "GET"]
    with pytest.raises(DeployError, match="is not a batch prediction job of projects/"):
        vertex_batch.attach(config, store, "projects/someone-else/locations/us-central1/batchPredictionJobs/1")
    with pytest.raises(DeployError, match="is not a batch prediction job"):
        vertex_batch.attach(config, store, "../../endpoints/1")
    emulator.finish_batch_jobs()


def test_teardown_finds_only_jobs_of_this_exact_deployment(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdxlctl.vertex import batch_inventory

    config, store = uploaded(cli, emulator, monkeypatch)
    emulator.slow("batchPredictionJobs")
    for name in ("sdxl-2", "sdxl2", "xsdxl"):
        foreign_job(emulator, config, store, name)
    assert batch_inventory.find(cloud(config), "sdxl") == []
    down = cli("teardown", "--yes", env=emulator.env())
    assert down.code == 0, down.err
    assert sorted(j["state"] for j in emulator.batch_jobs()) == ["JOB_STATE_RUNNING"] * 3
    touched = [r for r in emulator.requests() if "batchPredictionJobs/" in r["path"] and r["method"] != "GET"]
    assert touched == []
    emulator.finish_batch_jobs()


def test_a_wait_whose_polls_fail_says_the_job_keeps_running(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, store = uploaded(cli, emulator, monkeypatch)
    emulator.slow("batchPredictionJobs")

    def refuse_polls(counts: Counts) -> None:
        if counts.state == "RUNNING":
            emulator.fault(
                method="GET", path=r"/batchPredictionJobs/\d+$", code=403, status="PERMISSION_DENIED", times=50
            )

    with pytest.raises(SdxlctlError, match="the job itself keeps running") as raised:
        vertex_batch.run(config, store, submission(make_batch(1)), progress=refuse_polls)
    assert "sdxlctl batch --attach" in str(raised.value.hint)
    emulator.clear_faults()
    emulator.finish_batch_jobs()


def test_collect_reads_nothing_outside_the_jobs_raw_folder(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdxlctl.vertex.batch_output import collect

    config, _ = uploaded(cli, emulator, monkeypatch)
    bucket = emulator.storage().bucket(BUCKET)
    elsewhere = out().removeprefix(f"gs://{BUCKET}/") + "elsewhere/"
    bucket.blob(elsewhere + "prediction.results-00000-of-00001").upload_from_string(
        '{"key": "1", "prediction": {"images": []}}\n'
    )
    for directory in (f"gs://{BUCKET}/{elsewhere}", out() + "raw/../elsewhere/", "gs://another-bucket/raw/"):
        job = {"name": "j", "outputInfo": {"gcsOutputDirectory": directory}}
        with pytest.raises(DeployError, match="outside"):
            collect(cloud(config), job, make_batch(1), out(), None, lambda _: None)
    assert not bucket.blob(out().removeprefix(f"gs://{BUCKET}/") + "manifest.jsonl").exists()


def test_a_huge_image_or_replica_count_is_a_usage_error_not_an_overflow(cli: Cli) -> None:
    from sdxlctl.errors import UsageError
    from sdxlctl.pricing.batch import batch_estimate

    for images, replicas in ((10**400, 1), (10, 10**400)):
        with pytest.raises(UsageError, match="too many"):
            batch_estimate("l4", "us-central1", images=images, replicas=replicas)
    assert batch_estimate("l4", "us-central1", images=10**12).usd > 0  # large, still priced
    ran = cli("cost", "--images", "9" * 400)
    assert ran.code == 2 and "Traceback" not in ran.err and "too many" in ran.err, ran.err


def test_one_catalog_sku_with_no_price_does_not_throw_away_the_live_prices(cli: Cli, emulator: Emulator) -> None:
    import json

    from tests.emulator.billing import sku

    where = "running in Netherlands"
    skus = emulator.world.table("skus")
    catalog = {
        "CCCC-0004": (f"Spot Preemptible Vertex AI: Online/Batch Prediction Nvidia L4 GPU {where}", 0.2),
        "CCCC-0005": (f"Spot Preemptible Vertex AI: Online/Batch Prediction G2 Instance Core {where}", 0.01),
        "CCCC-0006": (f"Spot Preemptible Vertex AI: Online/Batch Prediction G2 Instance Ram {where}", 0.001),
        "CCCC-0007": (f"Vertex AI: Online/Batch Prediction A2 Instance Core {where}", 0.05),
    }
    for sku_id, (description, usd) in catalog.items():
        skus[sku_id] = sku(sku_id, description, ["europe-west4"], usd)
    skus["CCCC-0007"]["pricingInfo"] = []  # a SKU the catalog lists with no price (yet)
    env = {"SDXLCTL_GCP_API_ENDPOINT": emulator.url, "SDXLCTL_GCP_REGION": "europe-west4"}
    ran = cli("cost", "--live", "--images", "100", "--gpu", "l4", "--spot", "--json", env=env)
    assert ran.code == 0 and "IndexError" not in ran.err, ran.err
    assert json.loads(ran.out)["usd_per_replica_hour"] == pytest.approx(0.2 + 8 * 0.01 + 32 * 0.001)


def test_status_asks_nothing_about_a_job_a_tampered_state_file_names_in_another_project(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from sdxlctl.state import Resource

    _, store = uploaded(cli, emulator, monkeypatch)
    foreign = "projects/someone-else/locations/europe-west4/batchPredictionJobs/1"
    store.record("sdxl", Resource(kind="batch-20260101-000000", name=foreign, target="vertex", details={"lines": 2}))
    status = cli("status", "--json", env=emulator.env())
    assert status.code == 0, status.err
    (row,) = [r for r in json.loads(status.out)["resources"] if r["name"] == foreign]
    assert "not a job of this project" in json.dumps(row)
    assert not [r for r in emulator.requests() if "someone-else" in r["path"]]
    down = cli("teardown", "--yes", env=emulator.env())
    assert down.code == 0, down.err
    assert not [r for r in emulator.requests() if "someone-else" in r["path"]]
