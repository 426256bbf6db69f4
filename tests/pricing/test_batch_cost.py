"""What a batch costs (`sdxlctl cost --images N`, `sdxlctl batch --dry-run`): the arithmetic by hand from the
bundled table, Spot, more replicas, the batch size, the catalog's Spot SKUs, and the README's worked example."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdxlctl.errors import UsageError
from sdxlctl.pricing import batch_estimate, batch_size
from sdxlctl.pricing.batch import REPLICA_START_H
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator

ROOT = Path(__file__).resolve().parents[2]
# By hand from latency.json: 30 steps x 13.5 TFLOP + 10.5 for the VAE, on 121 TFLOP/s at the H200's 40.48%.
L4_SECONDS = (30 * 13.5 + 10.5) / (121 * 0.4048)
# From prices.json, us-central1: g2-standard-8 = 1 L4 + 8 vCPU + 32 GB; Spot rows 0.4 x those.
L4_HOURLY = 0.644046 + 8 * 0.02874255 + 32 * 0.00336605
L4_SPOT_HOURLY = 0.2576184 + 8 * 0.011497 + 32 * 0.0013464


def test_one_replica_by_hand() -> None:
    estimate = batch_estimate("l4", "us-central1", images=10_000, steps=30)
    work = 10_000 * L4_SECONDS / 3600  # 23.56 h of the GPU
    assert estimate.seconds_per_image == pytest.approx(L4_SECONDS)
    assert estimate.replica_hours == pytest.approx(work + REPLICA_START_H)
    assert estimate.wall_hours == pytest.approx(work + REPLICA_START_H)
    assert estimate.usd_per_replica_hour == pytest.approx(L4_HOURLY)
    assert estimate.usd == pytest.approx((work + REPLICA_START_H) * 0.9817, abs=0.01)
    assert (estimate.replicas, estimate.spot, estimate.verified) == (1, False, False)  # g2's vCPU/RAM split
    assert estimate.as_dict()["usd"] == round(estimate.usd, 2)


def test_spot_is_cheaper_for_the_same_hours_and_says_what_it_means() -> None:
    on_demand = batch_estimate("l4", "us-central1", images=10_000)
    spot = batch_estimate("l4", "us-central1", images=10_000, spot=True)
    assert spot.replica_hours == on_demand.replica_hours and spot.wall_hours == on_demand.wall_hours
    assert spot.usd_per_replica_hour == pytest.approx(L4_SPOT_HOURLY)
    assert spot.usd == pytest.approx(spot.replica_hours * L4_SPOT_HOURLY) and spot.usd < on_demand.usd
    assert not spot.verified  # no primary source gives a Spot rate
    assert any("may be preempted" in note for note in spot.notes)


def test_more_replicas_do_the_same_work_sooner_but_each_one_starts() -> None:
    one = batch_estimate("a100", "us-central1", images=10_000)
    four = batch_estimate("a100", "us-central1", images=10_000, replicas=4)
    work = one.replica_hours - REPLICA_START_H
    assert four.replica_hours == pytest.approx(work + 4 * REPLICA_START_H)  # 3 more starts, paid
    assert four.wall_hours == pytest.approx(work / 4 + REPLICA_START_H)
    assert four.usd - one.usd == pytest.approx(3 * REPLICA_START_H * four.usd_per_replica_hour)
    assert one.verified  # A100 and a2 are verified in us-central1


def test_bad_sizes_are_refused_by_name() -> None:
    with pytest.raises(UsageError, match="--replicas 0"):
        batch_estimate("l4", "us-central1", images=10, replicas=0)
    with pytest.raises(UsageError, match="num_images 0"):
        batch_size("l4", steps=30, num_images=0, time_limit_s=55, max_images=4)


@pytest.mark.parametrize(
    ("gpu", "num_images", "time_limit_s", "max_images", "expected"),
    [
        ("l4", 1, 55, 4, 4),  # max_images: 4 instances a request (time allows floor(44 / 8.48) = 5)
        ("l4", 1, 55, 16, 5),  # the time limit: 5 x 8.48 s = 42 s, within 80% of 55 s
        ("l4", 2, 55, 16, 2),  # 2 images an instance: floor(44 / 16.97) = 2
        ("l4", 3, 55, 4, 1),  # 4 // 3 = 1 instance of 3 images
        ("a100", 1, 3600, 16, 16),  # an hour allows hundreds; max_images caps at 16
        ("t4", 1, 55, 4, 1),  # over 60 s an image: one a request, never 0
    ],
)
def test_batch_size_is_bounded_by_the_time_limit_and_max_images(
    gpu: str, num_images: int, time_limit_s: float, max_images: int, expected: int
) -> None:
    got = batch_size(gpu, steps=30, num_images=num_images, time_limit_s=time_limit_s, max_images=max_images)
    assert got == expected


def test_cost_images_prints_the_estimate_the_door_computes(cli: Cli) -> None:
    from sdxlctl.batch import door
    from sdxlctl.config import load_config

    shown = cli("cost", "--images", "2000", "--gpu", "a100", "--replicas", "3", "--spot", "--json")
    assert shown.code == 0, shown.err
    expected = door.cost(load_config(environ={}), images=2000, gpu="a100", replicas=3, spot=True, steps=30)
    assert json.loads(shown.out) == expected.as_dict()
    text = cli("cost", "--images", "2000", "--gpu", "a100", "--replicas", "3", "--spot")
    assert text.code == 0, text.err
    said = " ".join((text.out + text.err).split())
    assert f"{expected.usd:,.2f}" in said and "Spot VMs" in said and "may be preempted" in said
    assert cli("cost", "--images", "0").code != 0  # at least one image


def test_cost_images_imports_no_cloud_or_torch(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys
        before = set(sys.modules)
        from sdxlctl.cli.app import run
        code = run(["cost", "--images", "100", "--json"])
        heavy = sorted(m for m in set(sys.modules) - before
                       if m.startswith(("torch", "diffusers", "gradio", "google.cloud", "google.api_core")))
        print(f"HEAVY={','.join(heavy)}", file=sys.stderr)
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "HEAVY=", done.stderr


def test_live_prices_read_the_catalogs_spot_skus(cli: Cli, emulator: Emulator) -> None:
    from tests.emulator.billing import sku

    where = "running in Netherlands"
    catalog = {
        "BBBB-0001": (f"Vertex AI: Online/Batch Prediction Nvidia L4 GPU {where}", 0.7),
        "BBBB-0002": (f"Vertex AI: Online/Batch Prediction G2 Instance Core {where}", 0.03),
        "BBBB-0003": (f"Vertex AI: Online/Batch Prediction G2 Instance Ram {where}", 0.004),
        "BBBB-0004": (f"Spot Preemptible Vertex AI: Online/Batch Prediction Nvidia L4 GPU {where}", 0.2),
        "BBBB-0005": (f"Spot Preemptible Vertex AI: Online/Batch Prediction G2 Instance Core {where}", 0.01),
        "BBBB-0006": (f"Spot Preemptible Vertex AI: Online/Batch Prediction G2 Instance Ram {where}", 0.001),
    }
    skus = emulator.world.table("skus")
    for sku_id, (description, usd) in catalog.items():
        skus[sku_id] = sku(sku_id, description, ["europe-west4"], usd)
    env = {"SDXLCTL_GCP_API_ENDPOINT": emulator.url, "SDXLCTL_GCP_REGION": "europe-west4"}
    args = ["cost", "--live", "--images", "1000", "--gpu", "l4", "--json"]
    spot = json.loads(cli(*args, "--spot", env=env).out)
    assert spot["usd_per_replica_hour"] == pytest.approx(0.2 + 8 * 0.01 + 32 * 0.001)
    assert spot["verified"] is True  # every part from a catalog SKU
    on_demand = json.loads(cli(*args, env=env).out)
    assert on_demand["usd_per_replica_hour"] == pytest.approx(0.7 + 8 * 0.03 + 32 * 0.004)  # not the Spot SKUs
    online = json.loads(cli("cost", "--live", "--gpu", "l4", "--spot", "--json", env=env).out)
    assert online["machine_usd_per_hour"] == pytest.approx(spot["usd_per_replica_hour"])


# ---------------------------------------------------------------- the README's worked example


def readme_example() -> dict[tuple[str, str], dict[str, str]]:
    """The rows of the table under "### What a batch costs": {(gpu, capacity): {column: cell}}."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### What a batch costs", 1)[1].split("\n#", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    header, *body = [[cell.strip() for cell in row] for row in rows]
    return {(row[0], row[1]): dict(zip(header, row, strict=True)) for row in body}


@pytest.mark.parametrize("gpu", ["l4", "a100"])
@pytest.mark.parametrize("spot", [False, True])
def test_the_readme_example_is_what_the_code_computes(gpu: str, spot: bool) -> None:
    """As `sdxlctl cost --images 10000 --gpu GPU [--spot]` computes it (door.cost) with the default config."""
    from sdxlctl.batch import door
    from sdxlctl.config import load_config

    estimate = door.cost(load_config(environ={}), images=10_000, gpu=gpu, replicas=None, spot=spot, steps=30)
    assert (estimate.region, estimate.replicas) == ("us-central1", 1)  # as the README says
    row = readme_example()[(gpu, "Spot" if spot else "on demand")]
    assert row == {
        "gpu": gpu,
        "capacity": "Spot" if spot else "on demand",
        "s/image": f"{estimate.seconds_per_image:.2f}",
        "replica hours": f"{estimate.replica_hours:,.2f}",
        "hours until done": f"{estimate.wall_hours:,.2f}",
        "USD/replica hour": f"{estimate.usd_per_replica_hour:,.4f}",
        "USD": f"{estimate.usd:,.2f}",
    }


def test_the_readme_says_the_replica_start_the_code_counts() -> None:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### What a batch costs", 1)[1]
    assert f"counted as {REPLICA_START_H * 60:g} minutes" in " ".join(section.split())
