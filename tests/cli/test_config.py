"""sdxlctl.toml: one validated object; the example documents the defaults; bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxlctl.config import Config, load_config
from sdxlctl.errors import ConfigError
from tests.servers import ROOT

EXAMPLE = ROOT / "sdxlctl.toml"


def test_the_example_config_is_exactly_the_defaults() -> None:
    assert load_config(EXAMPLE, {}).model_dump(exclude={"path"}) == Config().model_dump(exclude={"path"})


def test_every_key_is_in_the_example_and_commented() -> None:
    lines = EXAMPLE.read_text().splitlines()
    settings = {i: line.split("=")[0].strip() for i, line in enumerate(lines) if "=" in line and line[0] != "#"}
    for i, key in settings.items():
        assert "#" in lines[i] or lines[i - 1].startswith("#"), f"{key} has no comment"
    for name, field in Config.model_fields.items():
        keys = getattr(field.annotation, "model_fields", None) or {name: None}
        for key in keys:
            assert key in settings.values() or name == "path", f"{name}.{key} is missing from the example"


def test_no_file_means_defaults_and_state_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {})
    assert config.path is None and config.target == "local" and config.model.source == "tiny"
    assert config.home == tmp_path / ".sdxlctl"


def test_a_file_in_the_current_folder_is_found_and_state_lives_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sdxlctl.toml").write_text('name = "fox"\n[deploy]\ngpu = "a100"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {})
    assert (config.name, config.deploy.gpu) == ("fox", "a100")
    assert config.home == tmp_path / ".sdxlctl"


def test_environment_overrides_file_values(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[deploy]\ngpu = "a100"\n')
    config = load_config(
        path,
        {
            "SDXLCTL_DEPLOY_GPU": "h100",
            "SDXLCTL_LOCAL_SERVER_PORT": "9000",
            "SDXLCTL_NAME": "other",
            "SDXLCTL_UI_PUBLIC": "true",
            "UNRELATED": "x",
        },
    )
    assert (config.deploy.gpu, config.local.server_port, config.name, config.ui.public) == ("h100", 9000, "other", True)


def test_an_environment_error_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SDXLCTL_DEPLOY_GPU"):
        load_config(None, {"SDXLCTL_DEPLOY_GPU": "a1000"})


def test_the_fast_path_settings_reach_both_targets(tmp_path: Path) -> None:
    from sdxlctl.local import processes as local
    from sdxlctl.vertex.names import container_env

    path = tmp_path / "c.toml"
    path.write_text('[model]\noptimize = "compile"\nwarmup = ["1024x1024", "768X1344"]\n')
    config = load_config(path, {"SDXLCTL_MODEL_COMPILE_CACHE": "/srv/compile-cache"})
    assert config.model.warmup == ["1024x1024", "768x1344"]
    for env in (local.server_spec(config).env, container_env(config)):
        assert env["SDXL_OPTIMIZE"] == "compile" and env["SDXL_WARMUP"] == "1024x1024,768x1344"
        assert env["SDXL_COMPILE_CACHE"] == "/srv/compile-cache"
    from_env = load_config(None, {"SDXLCTL_MODEL_WARMUP": "1024x1024, 832x1216"})
    assert from_env.model.warmup == ["1024x1024", "832x1216"]


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("SDXLCTL_MODEL_WARMUP", "1024x1001", "multiples of 8"),
        ("SDXLCTL_MODEL_OPTIMIZE", "turbo", "compile"),
        ("SDXLCTL_MODEL_COMPILE_CACHE", "cache/", "gs://"),
    ],
)
def test_a_bad_fast_path_setting_names_the_variable_and_the_fix(var: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, {var: value})
    assert var in str(raised.value) and says in str(raised.value)
