"""Bad config files and bad flags: exit 2, one message naming the key or flag, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxlctl.state import Resource, StateStore
from tests.conftest import Cli

BAD_CONFIGS: list[tuple[str, str, str]] = [
    # (id, sdxlctl.toml, what the message must name)
    ("unknown-top-level-key", 'nmae = "fox"\n', "nmae"),
    ("unknown-section", '[deplyo]\ngpu = "a100"\n', "deplyo"),
    ("unknown-key-in-section", '[deploy]\ngpus = "a100"\n', "deploy.gpus"),
    ("unknown-gpu", '[deploy]\ngpu = "a1000"\n', "deploy.gpu"),
    ("unknown-target", 'target = "gke"\n', "target"),
    ("name-with-spaces", 'name = "My Deployment"\n', "name"),
    ("name-empty", 'name = ""\n', "name"),
    ("name-too-long", f'name = "{"a" * 40}"\n', "name"),
    ("queue-negative", "[model]\nqueue_size = -1\n", "model.queue_size"),
    ("time-limit-zero", "[model]\ntime_limit_s = 0\n", "model.time_limit_s"),
    ("max-images-100", "[model]\nmax_images = 100\n", "model.max_images"),
    ("dtype-int8", '[model]\ndtype = "int8"\n', "model.dtype"),
    ("min-above-max-replicas", "[deploy]\nmin_replicas = 3\nmax_replicas = 1\n", "min_replicas"),
    ("max-replicas-zero", "[deploy]\nmax_replicas = 0\n", "deploy.max_replicas"),
    ("endpoint-private", '[deploy]\nendpoint = "private"\n', "deploy.endpoint"),
    ("timeout-500-min", "[deploy]\ntimeout_min = 500\n", "deploy.timeout_min"),
    ("port-70000", "[local]\nserver_port = 70000\n", "local.server_port"),
    ("port-text", '[local]\nserver_port = "eighty"\n', "local.server_port"),
    ("public-maybe", '[ui]\npublic = "maybe"\n', "ui.public"),
    ("not-toml", "[deploy\ngpu = a100\n", "not valid TOML"),
    ("section-not-a-table", 'gcp = "my-project"\n', "gcp"),
    ("list-for-a-string", '[gcp]\nproject = ["a", "b"]\n', "gcp.project"),
]


@pytest.mark.parametrize(("toml", "names"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_a_bad_config_exits_2_naming_the_key(cli: Cli, toml: str, names: str) -> None:
    with open("sdxlctl.toml", "w") as file:
        file.write(toml)
    result = cli("status")
    assert result.code == 2, result
    assert "sdxlctl.toml" in result.err and names in result.err
    assert "Traceback" not in result.err + result.out


BAD_ENV = [
    ("SDXLCTL_DEPLOY_GPU", "a1000"),
    ("SDXLCTL_LOCAL_SERVER_PORT", "abc"),
    ("SDXLCTL_DEPLOY_GPUS", "a100"),
    ("SDXLCTL_TARGET", "aws"),
]


@pytest.mark.parametrize(("var", "value"), BAD_ENV)
def test_a_bad_environment_override_exits_2_naming_the_variable(cli: Cli, var: str, value: str) -> None:
    result = cli("status", env={var: value})
    assert result.code == 2 and var in result.err, result
    assert "Traceback" not in result.err


def test_a_missing_config_file_exits_2(cli: Cli) -> None:
    result = cli("--config", "nowhere.toml", "status")
    assert result.code == 2 and "nowhere.toml" in result.err


BAD_FLAGS: list[tuple[str, list[str], str]] = [
    ("predict-without-prompt", ["predict"], "prompt"),
    ("steps-0", ["predict", "fox", "--steps", "0"], "--steps"),
    ("steps-text", ["predict", "fox", "--steps", "many"], "--steps"),
    ("width-7", ["predict", "fox", "--width", "7"], "--width"),
    ("height-not-multiple-of-8", ["predict", "fox", "--height", "100"], "--height"),
    ("format-gif", ["predict", "fox", "--format", "gif"], "--format"),
    ("output-bmp", ["predict", "fox", "-o", "fox.bmp"], "-o"),
    ("format-mismatch", ["predict", "fox", "-o", "fox.png", "--format", "jpeg"], "--format"),
    ("unknown-style", ["predict", "fox", "--style", "vaporwave"], "--style"),
    ("num-images-0", ["predict", "fox", "-n", "0"], "--num-images"),
    ("seed-negative", ["predict", "fox", "--seed", "-1"], "--seed"),
    ("guidance-100", ["predict", "fox", "--guidance", "100"], "--guidance"),
    ("quality-0", ["predict", "fox", "--quality", "0", "-o", "f.jpg"], "--quality"),
    ("deploy-unknown-gpu", ["deploy", "--gpu", "a1000"], "--gpu"),
    ("unknown-command", ["deplyo"], "deplyo"),
    ("unknown-flag", ["status", "--jsn"], "--jsn"),
    ("cost-negative-days", ["cost", "--days", "-1"], "--days"),
]


@pytest.mark.parametrize(("args", "names"), [c[1:] for c in BAD_FLAGS], ids=[c[0] for c in BAD_FLAGS])
def test_a_bad_flag_exits_2_naming_the_flag(cli: Cli, args: list[str], names: str) -> None:
    result = cli(*args)
    assert result.code == 2, result
    assert names in result.err, result.err
    assert "Traceback" not in result.err + result.out


def test_vertex_without_a_project_says_so_and_exits_2(cli: Cli, tmp_path: Path) -> None:
    for args in (["deploy"], ["build"], ["upload"], ["teardown", "--yes"], ["predict", "fox"]):
        result = cli(*args, env={"SDXLCTL_TARGET": "vertex"})
        assert result.code == 2 and "[gcp] project" in result.err, (args, result)
        assert result.out == "" and list(tmp_path.iterdir()) == [], args  # refused before doing anything


def test_build_and_upload_are_no_ops_on_the_local_target(cli: Cli, tmp_path: Path) -> None:
    store = StateStore(tmp_path / ".sdxlctl")
    with store.transaction() as state:  # something deployed: a no-op must leave its record as it is
        state.put("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", details={"pid": 0}))
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for command, says in (("build", "no image to build"), ("upload", "nothing to upload")):
        result = cli(command)
        assert result.code == 0 and says in result.err and result.out == "", result
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


def test_predict_with_nothing_deployed_says_what_to_do(cli: Cli) -> None:
    result = cli("predict", "fox", "-o", "fox.png")
    assert result.code == 1
    assert "nothing is deployed" in result.err and "sdxlctl deploy" in result.err


def test_version_and_help(cli: Cli) -> None:
    version = cli("--version")
    assert version.code == 0 and version.out.startswith("sdxlctl ")
    help_ = cli("--help")
    assert help_.code == 0
    for command in ("build", "upload", "deploy", "predict", "ui-deploy", "teardown", "cost", "status"):
        assert command in help_.out


def test_an_internal_error_is_one_line_unless_debug(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdxlctl import core

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(core, "status", broken)
    result = cli("status")
    assert result.code == 1 and "internal error: ZeroDivisionError: boom" in result.err
    assert "Traceback" not in result.err
    with pytest.raises(ZeroDivisionError):
        cli("--debug", "status")
