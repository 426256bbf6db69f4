"""[deploy] spot = true: the online replicas on Spot VMs (DedicatedResources.spot, v1), priced at Spot rates.

Against the emulator with the real client: what the deployModel request carried is what the endpoint holds.
"""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import Cli
from tests.emulator_fixtures import Emulator

MEANING = "cheaper, may be preempted; Vertex AI restarts a preempted replica"


def deployed(emulator: Emulator) -> dict[str, Any]:
    (endpoint,) = emulator.resources()["endpoints"]
    (model,) = endpoint["deployedModels"]
    return dict(model["dedicatedResources"])


def test_deploy_with_spot_asks_for_spot_vms_and_a_change_of_spot_redeploys(cli: Cli, emulator: Emulator) -> None:
    spot = emulator.env(SDXLCTL_DEPLOY_SPOT="true")
    for step in (["build"], ["upload"]):
        assert cli(*step, env=spot).code == 0
    plan = cli("deploy", "--dry-run", env=spot)
    assert plan.code == 0, plan.err
    said = " ".join((plan.out + plan.err).split())
    assert "Spot VMs" in said and MEANING in said, said

    done = cli("deploy", env=spot)
    assert done.code == 0, done.err
    assert deployed(emulator)["spot"] is True
    (sent,) = [r for r in emulator.requests() if r["path"].endswith(":deployModel")]
    assert sent["body"]["deployedModel"]["dedicatedResources"]["spot"] is True  # as the client sent it

    again = cli("deploy", env=spot)
    assert again.code == 0 and "unchanged" in again.err, again.err

    on_demand = cli("deploy", env=emulator.env())  # spot false: a change, so a new deployment replaces it
    assert on_demand.code == 0, on_demand.err
    assert not deployed(emulator).get("spot", False)
    assert cli("teardown", "--yes", env=spot).code == 0


def test_cost_prices_the_replicas_at_spot_rates_and_says_so(cli: Cli) -> None:
    on_demand = json.loads(cli("cost", "--json").out)
    spot = cli("cost", "--json", env={"SDXLCTL_DEPLOY_SPOT": "true"})
    assert spot.code == 0, spot.err
    priced = json.loads(spot.out)
    assert priced["spot"] is True and on_demand["spot"] is False
    assert priced["machine_usd_per_hour"] < on_demand["machine_usd_per_hour"]
    assert priced["usd"]["endpoint"] < on_demand["usd"]["endpoint"]
    assert any(MEANING in note for note in priced["notes"]), priced["notes"]
    assert any("Spot" in note for note in priced["unverified"])  # no primary source gives Spot rates
    flag = json.loads(cli("cost", "--json", "--spot").out)  # --spot: the same, without the config
    assert flag["machine_usd_per_hour"] == priced["machine_usd_per_hour"]
