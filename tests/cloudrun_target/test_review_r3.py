"""Review R3 (issue 17): target cloudrun as a newcomer meets it through the command line, the template and
the README: the words fit the target, the help names it, the README's figures and layout hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.emulator_fixtures import Emulator

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_deploy_on_cloudrun_names_a_service_not_an_endpoint(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env(SDXLCTL_TARGET="cloudrun")
    assert cli("build", env=env).code == 0
    deployed = cli("deploy", env=env)
    assert deployed.code == 0, deployed.err
    url = deployed.out.strip()
    assert f"✓ service: {url}" in deployed.err, deployed.err
    assert "endpoint" not in deployed.err, deployed.err  # a Cloud Run service, not a Vertex AI endpoint


@pytest.mark.parametrize("command", ["deploy", "upload", "ui-deploy", "logs", "check"])
def test_help_of_each_step_says_what_it_does_on_cloudrun(cli: Cli, command: str) -> None:
    shown = cli(command, "--help")
    assert shown.code == 0
    assert "cloudrun" in " ".join(shown.out.split()), shown.out


def test_the_template_says_which_keys_target_cloudrun_uses() -> None:
    """[gcp] project is needed on both cloud targets; [deploy]'s replica and endpoint keys are vertex's only."""
    for path in (ROOT / "sdxlctl" / "example.toml", ROOT / "sdxlctl.toml"):
        text = path.read_text(encoding="utf-8")
        project = next(line for line in text.splitlines() if line.startswith("project ="))
        assert "cloudrun" in project, project
        deploy = text.split("[deploy]", 1)[1].split("\n[", 1)[0]
        for key in ("min_replicas", "max_replicas", "endpoint", "timeout_min"):
            assert key in deploy
        assert re.search(r"target cloudrun.*\[cloudrun\]", deploy), deploy


def test_readme_points_only_at_files_in_the_repository() -> None:
    """A link or a named source file a reader of the repository can open (../shared/ is not in it)."""
    assert "../shared" not in README
    for target in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / target).exists(), target


def test_readme_layout_names_the_cloudrun_target_and_its_tests() -> None:
    layout = README.split("Layout:", 1)[1]
    assert "`cloudrun/`" in layout and "`cloudrun_target/`" in layout, layout


def test_init_asks_for_the_region_of_either_cloud_target(cli: Cli) -> None:
    shown = " ".join(cli("init", "--help").out.split())
    assert "region of the endpoint or the Cloud Run service" in shown, shown
