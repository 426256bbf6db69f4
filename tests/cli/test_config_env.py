"""The environment and the config: SDXLCTL_CONFIG/SDXLCTL_DEBUG are the global options' env forms, other
SDXLCTL_* must be config keys, target vertex needs a project, and `sdxlctl config` says where each value came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdxlctl.config import GLOBAL_ENV, env_names, gcloud_project, load_config
from tests.conftest import Cli

# ---------------------------------------------------------------- B.4: the global options' env forms


def test_sdxlctl_config_names_the_file_as_config_does(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "fox.toml").write_text('name = "fox"\n')
    result = cli("config", "--json", env={"SDXLCTL_CONFIG": "fox.toml"})
    assert result.code == 0, result
    data = json.loads(result.out)
    assert data["file_from"] == "SDXLCTL_CONFIG" and data["file"] == str(tmp_path / "fox.toml")
    assert {"key": "name", "value": "fox", "source": str(tmp_path / "fox.toml"), "env": "SDXLCTL_NAME"} in (
        data["settings"]
    )


def test_sdxlctl_config_to_a_missing_file_is_that_error_not_an_unknown_key(cli: Cli) -> None:
    result = cli("status", env={"SDXLCTL_CONFIG": "x.toml"})
    assert result.code == 2 and "x.toml: no such file" in result.err, result
    assert "unknown key" not in result.err


def test_sdxlctl_debug_turns_on_debug_as_the_flag_does(cli: Cli) -> None:
    assert cli("status", env={"SDXLCTL_DEBUG": "1"}).code == 0
    # A config error shows its traceback only under --debug: the variable does the same.
    failed = cli("status", env={"SDXLCTL_DEBUG": "1", "SDXLCTL_CONFIG": "x.toml"})
    assert failed.code == 2 and "Traceback" in failed.err
    quiet = cli("status", env={"SDXLCTL_DEBUG": "0", "SDXLCTL_CONFIG": "x.toml"})
    assert quiet.code == 2 and "Traceback" not in quiet.err


def test_the_global_variables_are_not_config_keys() -> None:
    config = load_config(None, {"SDXLCTL_CONFIG": "elsewhere.toml", "SDXLCTL_DEBUG": "1", "SDXLCTL_NAME": "fox"})
    assert config.name == "fox"
    assert set(GLOBAL_ENV) <= set(env_names())


def test_a_stray_variable_is_refused_with_the_variables_sdxlctl_reads(cli: Cli) -> None:
    result = cli("status", env={"SDXLCTL_VERBOSE": "1"})
    assert result.code == 2 and "SDXLCTL_VERBOSE" in result.err, result
    for listed in ("SDXLCTL_CONFIG", "SDXLCTL_DEBUG", "SDXLCTL_GCP_PROJECT", "SDXLCTL_DEPLOY_GPU"):
        assert listed in result.err
    assert result.err.count("\n") == 2 and "Traceback" not in result.err  # one error line, one hint line


def test_an_unknown_key_of_a_section_lists_that_sections_variables(cli: Cli) -> None:
    result = cli("status", env={"SDXLCTL_GCP_PROJEKT": "p"})
    assert result.code == 2 and "SDXLCTL_GCP_PROJEKT" in result.err
    assert "SDXLCTL_GCP_PROJECT" in result.err and "SDXLCTL_DEPLOY_GPU" not in result.err


# ---------------------------------------------------------------- B.6: no project on target vertex


def _gcloud_config(folder: Path, project: str, active: str = "work") -> Path:
    """gcloud's own files, as `gcloud config configurations create work; gcloud config set project ...` leave them."""
    (folder / "configurations").mkdir(parents=True)
    (folder / "active_config").write_text(active)
    (folder / "configurations" / f"config_{active}").write_text(f"[core]\naccount = a@b.c\nproject = {project}\n")
    return folder


@pytest.mark.parametrize(
    "args",
    [["deploy", "--dry-run"], ["build", "--dry-run"], ["upload", "--dry-run"], ["ui-deploy", "--dry-run"]],
    ids=lambda args: args[0],
)
def test_vertex_without_a_project_is_a_config_error_even_in_a_dry_run(
    cli: Cli, tmp_path: Path, args: list[str]
) -> None:
    env = {"SDXLCTL_TARGET": "vertex", "CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud")}
    result = cli(*args, "--json", env=env)
    assert result.code == 2, result
    assert "[gcp] project" in result.err and "SDXLCTL_GCP_PROJECT" in result.err
    assert "gcloud config get-value project" in result.err  # where a default could come from
    assert result.out == "" and "@.iam" not in result.err and "gs://-" not in result.err


def test_the_hint_names_gclouds_default_project_without_taking_it(cli: Cli, tmp_path: Path) -> None:
    gcloud = _gcloud_config(tmp_path / "gcloud", "fox-project")
    result = cli("deploy", "--dry-run", env={"SDXLCTL_TARGET": "vertex", "CLOUDSDK_CONFIG": str(gcloud)})
    assert result.code == 2 and "'fox-project'" in result.err and 'project = "fox-project"' in result.err


def test_gcloud_project_is_read_as_gcloud_resolves_it(tmp_path: Path) -> None:
    gcloud = _gcloud_config(tmp_path, "from-file")
    assert gcloud_project({"CLOUDSDK_CONFIG": str(gcloud)}) == "from-file"
    assert gcloud_project({"CLOUDSDK_CONFIG": str(gcloud), "CLOUDSDK_CORE_PROJECT": "from-env"}) == "from-env"
    assert gcloud_project({"CLOUDSDK_CONFIG": str(gcloud), "CLOUDSDK_ACTIVE_CONFIG_NAME": "other"}) == ""
    assert gcloud_project({"CLOUDSDK_CONFIG": str(tmp_path / "none")}) == ""


# ---------------------------------------------------------------- `sdxlctl config`


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    from sdxlctl.cli import config_cmd  # noqa: F401  (registers `sdxlctl config` on the app)

    monkeypatch.chdir(tmp_path)
    for var in list(os.environ):
        if var.startswith("SDXLCTL_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    return CliRunner()


def _sources(runner: CliRunner, *args: str, env: dict[str, str] | None = None) -> dict:
    from sdxlctl.cli.root import app

    result = runner.invoke(app, [*args, "config", "--json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_config_says_where_each_value_came_from(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "sdxlctl.toml").write_text('name = "fox"\n[deploy]\ngpu = "a100"\nmax_replicas = 3\n')
    data = _sources(runner, env={"SDXLCTL_DEPLOY_MAX_REPLICAS": "2"})
    rows = {row["key"]: (row["value"], row["source"]) for row in data["settings"]}
    file = str(tmp_path / "sdxlctl.toml")
    assert rows["name"] == ("fox", file) and rows["deploy.gpu"] == ("a100", file)
    assert rows["deploy.max_replicas"] == (2, "SDXLCTL_DEPLOY_MAX_REPLICAS")  # the variable over the file
    assert rows["gcp.region"] == ("us-central1", "default")
    assert data["file"] == file and "current folder" in data["file_from"]


def test_config_names_the_flag_or_variable_that_chose_the_file(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "other.toml").write_text('target = "vertex"\n')
    assert _sources(runner, "--config", "other.toml")["file_from"] == "--config"
    assert _sources(runner, env={"SDXLCTL_CONFIG": "other.toml"})["file_from"] == "SDXLCTL_CONFIG"
    defaults = _sources(runner)
    assert defaults["file"] is None and {row["source"] for row in defaults["settings"]} == {"default"}


def test_config_shows_every_key_at_80_columns(runner: CliRunner, tmp_path: Path) -> None:
    from sdxlctl.cli.root import app
    from sdxlctl.config import Config

    (tmp_path / "sdxlctl.toml").write_text('[gcp]\nproject = "fox-project"\n')
    result = runner.invoke(app, ["config"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name, field in Config.model_fields.items():
        keys = [f"{name}.{key}" for key in getattr(field.annotation, "model_fields", {})] or [name]
        for key in keys if name != "path" else []:
            assert any(line.split()[:1] == [key] for line in lines), key
    assert any(line.split() == ["gcp.project", '"fox-project"', "sdxlctl.toml"] for line in lines)
