"""The command line as a new user meets it: help that shows what it says, -h, global options anywhere,
`sdxlctl styles`, and a line for each flag the target ignores (issue #14, B.1 2 3 9 10 12)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer
from packaging.specifiers import SpecifierSet
from typer.testing import CliRunner

from sdxlctl.cli.app import run
from sdxlctl.cli.root import app
from tests.conftest import Cli

ROOT = Path(__file__).resolve().parents[2]
CONFIG_KEY = re.compile(r"\[(\w+)\] (\w+)")  # `[deploy] gpu`, as help texts name a key of sdxlctl.toml


def commands() -> dict[str, Any]:
    """Every registered command, as typer builds it (before the app's group escapes its help)."""
    run(["--version"])  # imports every module that registers a command
    group = typer.main.get_command(app)
    return dict(group.commands)  # type: ignore[attr-defined]


def source_keys(command: Any) -> set[str]:
    """The `[section] key` names that the help texts of `command` and its options are written with."""
    texts = [command.help or "", *(getattr(param, "help", None) or "" for param in command.params)]
    return {match.group(0) for text in texts for match in CONFIG_KEY.finditer(text)}


def test_some_help_names_config_keys() -> None:
    named = {name: source_keys(command) for name, command in commands().items()}
    assert "[deploy] gpu" in named["deploy"] and "[gcp] region" in named["cost"]


@pytest.mark.parametrize("name", sorted(commands()))
def test_help_of_every_command_shows_every_config_key_it_names(name: str) -> None:
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"}, prog_name="sdxlctl")
    assert result.exit_code == 0, result.output
    for key in source_keys(commands()[name]):
        assert key in result.output, f"`{name} --help` lost {key!r}"
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output  # a flag takes no value
    assert "-h" in result.output


def unboxed(text: str) -> str:
    """Help text without the panels' borders and with line breaks as spaces: what a reader reads."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_help_at_80_columns_piped_shows_keys_takes_h_and_no_bool() -> None:
    names = sorted(commands())
    script = "import sys\nfrom sdxlctl.cli.app import run\nfor name in sys.argv[1:]:\n    run([name, '-h'])\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")} | {"COLUMNS": "80"}
    rendered = subprocess.run(
        [sys.executable, "-c", script, *names], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
    )
    assert rendered.returncode == 0, rendered.stderr
    pages = re.split(r"(?=^ Usage: )", rendered.stdout, flags=re.M)[1:]
    assert len(pages) == len(names)
    for name, page in zip(names, pages, strict=True):
        assert page.startswith(f" Usage: sdxlctl {name} ")
        assert max(map(len, page.splitlines())) <= 80
        assert "<bool>" not in page
        for key in source_keys(commands()[name]):
            section = key.split("]")[0] + "]"
            assert section in page and key in unboxed(page), f"`{name} -h` at 80 columns lost {key!r}"


def test_h_is_help_for_the_app_and_every_command(cli: Cli) -> None:
    top = cli("-h")
    assert top.code == 0 and "Usage: sdxlctl" in top.out and "styles" in top.out
    assert "<bool>" not in top.out
    assert cli("status", "-h").out == cli("status", "--help").out


def test_global_options_after_the_subcommand(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "other.toml").write_text('name = "other"\n')
    assert cli("status", "--debug").code == 0
    for args in (["status", "-c", "other.toml", "--json"], ["status", "--json", "--config=other.toml"]):
        result = cli(*args)
        assert result.code == 0, result.err
        assert json.loads(result.out)["deployment"] == "other"
    missing = cli("status", "--debug", "--config", "missing.toml")
    assert missing.code == 2 and "missing.toml" in missing.err


def test_global_options_leave_a_subcommands_own_values_alone() -> None:
    from sdxlctl.cli.group import Group

    group = typer.main.get_command(app)
    assert isinstance(group, Group)
    ctx = group.make_context("sdxlctl", ["status"])
    assert group.hoisted(ctx, ["predict", "fox", "-o", "--debug"]) == ["predict", "fox", "-o", "--debug"]
    assert group.hoisted(ctx, ["predict", "--", "--debug"]) == ["predict", "--", "--debug"]
    assert group.hoisted(ctx, ["-c", "a.toml", "status", "-c", "b.toml", "--json"]) == [
        "-c",
        "a.toml",
        "-c",
        "b.toml",
        "status",
        "--json",
    ]


def test_styles_lists_the_servers_presets_with_their_templates(cli: Cli) -> None:
    server = json.loads((ROOT / "containers/model/sdxl_server/styles.json").read_text())["styles"]
    listed = cli("styles")
    assert listed.code == 0, listed.err
    assert len(server) == 17
    for preset in server:
        assert f"{preset['id']}  ({preset['name']})" in listed.out
        assert f"prompt:   {preset['prompt']}" in listed.out
    assert json.loads(cli("styles", "--json").out) == server
    help_ = cli("predict", "--help").out
    assert "sdxlctl styles" in help_ and "--help-styles" not in help_


def test_styles_without_the_server_package_says_so_in_one_line(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sdxl_server", None)  # what importing it does in a cloud-only install
    result = cli("styles")
    assert result.code == 2 and result.out == ""
    assert len(result.err.strip().splitlines()) == 1 and "sdxl_server" in result.err


def test_a_deployed_ui_is_called_the_ui(capsys: pytest.CaptureFixture[str]) -> None:
    from sdxlctl.cli import render
    from sdxlctl.state import Resource
    from sdxlctl.steps import DeployResult

    ui = Resource(kind="local-ui", name="sdxl-ui", target="local", url="http://127.0.0.1:7860", details={"pid": 1})
    render.deployed(DeployResult("started", ui, 1.0, what="UI"))
    shown = capsys.readouterr()
    assert "UI started at http://127.0.0.1:7860" in shown.err and "model server" not in shown.err
    assert shown.out.strip() == "http://127.0.0.1:7860"


@pytest.mark.parametrize(
    "args, option",
    [
        (["deploy", "--gpu", "a100"], "--gpu"),
        (["ui-deploy", "--public"], "--public"),
        (["teardown", "--images"], "--images"),
    ],
)
def test_a_flag_the_local_target_ignores_is_named_in_one_line(cli: Cli, args: list[str], option: str) -> None:
    result = cli(*args, "--dry-run")
    assert result.code == 0, result.err
    notes = [line for line in result.err.splitlines() if "ignored" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: {option} is ignored on target local: ")
    plain = cli(*args[:1], "--dry-run")
    assert "ignored" not in plain.err


def test_vertex_uses_the_flags_local_ignores(cli: Cli) -> None:
    env = {"SDXLCTL_TARGET": "vertex", "SDXLCTL_GCP_PROJECT": "demo"}
    result = cli("deploy", "--gpu", "a100", "--dry-run", env=env)
    assert result.code == 0, result.err
    assert "ignored" not in result.err and "a100" in result.err.lower()


def test_typer_and_rich_ranges_start_at_what_ci_installs() -> None:
    """The lowest typer and rich allowed are the versions constraints.txt pins, which CI installs and tests."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    for package in ("typer", "rich"):
        (spec,) = [d[len(package) :] for d in declared if re.match(rf"{package}\b", d)]
        allowed = SpecifierSet(spec)
        floor = next(s.version for s in allowed if s.operator == ">=")
        assert any(s.operator == "<" for s in allowed), f"{package} has no ceiling"
        assert floor == pins[package], f"{package}: the floor {floor} is not what CI installs ({pins[package]})"
        assert version(package) in allowed


def test_the_command_list_follows_a_deployments_life_one_line_each(cli: Cli) -> None:
    result = cli("-h", env={"COLUMNS": "120"})
    assert result.code == 0, result.err
    panel = result.out.split("Commands", 1)[1].splitlines()
    commands = [line[2:].split()[0] for line in panel if line.startswith("│ ") and line[2] != " "]
    assert commands[:5] == ["init", "check", "build", "upload", "deploy"] and commands[-1] == "styles", commands
    assert commands.index("teardown") > commands.index("status")
    check_line = next(line for line in result.out.splitlines() if line.startswith("│ check"))
    assert "exit 1 if any fails" in check_line  # the summary is its first paragraph, on one line
