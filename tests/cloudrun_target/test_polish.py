"""Polish of target cloudrun (issue 17): teardown's plan names every image the run deletes, the estimate's JSON
and text name a service, the UI's service waits as long as the model may, Monitoring's filter takes only ids."""

from __future__ import annotations

from pathlib import Path

from sdxlctl.state import Resource, StateStore
from tests.cloudrun_target.made import deploy, env
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, REGION, Emulator


def test_teardown_images_dry_run_lists_both_packages_the_run_deletes(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    """Only the server image recorded (deploy built it, the UI's was pushed elsewhere): the run deletes both."""
    home = tmp_path / ".sdxlctl"
    deploy(emulator, home)
    image = f"{REGION}-docker.pkg.dev/{PROJECT}/sdxlctl/sdxl-server:v1"
    StateStore(home).record("sdxl", Resource(kind="server-image", name=image, target="vertex"))
    before = len(emulator.requests())
    plan = cli("teardown", "--dry-run", "--images", env=env(emulator))
    assert plan.code == 0, plan.err
    assert emulator.requests()[before:] == []
    text = " ".join((plan.out + plan.err).split())
    for package in ("sdxl-server", "sdxl-ui"):
        assert f"/packages/{package}" in text, (package, text)
    plain = cli("teardown", "--dry-run", env=env(emulator))
    assert "/packages/" not in plain.out + plain.err  # images only with --images
