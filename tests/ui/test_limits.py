"""One set of limits: the CLI, the model server and the UI refuse and offer the same ranges.

The running page's sliders are checked in test_api.py::test_gradio_client_calls_generate (one UI process
for both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli
from tests.servers import free_port


def _cli_ranges() -> dict[str, tuple[Any, Any]]:
    """predict's options as the parser sees them: (min, max), the range a user actually gets."""
    import typer

    from sdxlctl.cli import commands  # noqa: F401  (registers the commands on the app)
    from sdxlctl.cli.app import app

    predict = typer.main.get_command(app).commands["predict"]  # type: ignore[attr-defined]
    # typer >= 0.29 keeps the range on the option; before, on click's IntRange/FloatRange type
    sources = {param.name: param if hasattr(param, "max") else param.type for param in predict.params}
    return {name: (getattr(s, "min", None), getattr(s, "max", None)) for name, s in sources.items()}


def test_steps_guidance_and_sizes_agree_between_cli_server_and_ui() -> None:
    from sdxl_server import schema
    from sdxl_ui import limits

    ranges = _cli_ranges()
    assert ranges["steps"] == (schema.MIN_STEPS, schema.MAX_STEPS)
    assert (limits.MIN_STEPS, limits.MAX_STEPS) == (schema.MIN_STEPS, schema.MAX_STEPS)
    assert ranges["guidance"] == (schema.MIN_GUIDANCE, schema.MAX_GUIDANCE)
    assert (limits.MIN_GUIDANCE, limits.MAX_GUIDANCE) == (schema.MIN_GUIDANCE, schema.MAX_GUIDANCE)
    for side in ("width", "height"):
        assert ranges[side] == (schema.MIN_SIDE, schema.MAX_SIDE)
    assert (limits.MIN_SIDE, limits.MAX_SIDE) == (schema.MIN_SIDE, schema.MAX_SIDE)


def test_max_images_is_one_default_passed_to_server_and_ui() -> None:
    from sdxl_server.settings import Settings
    from sdxl_ui import limits
    from sdxlctl.config import Config
    from sdxlctl.local import processes as local

    assert Config().model.max_images == Settings().max_images == limits.DEFAULT_MAX_IMAGES
    config = Config.model_validate({"model": {"max_images": 2}})
    assert local.server_spec(config).env["SDXL_MAX_IMAGES"] == "2"
    assert local.ui_spec(config, "http://127.0.0.1:1").env["SDXL_UI_MAX_IMAGES"] == "2"
    # -n has no ceiling of its own: the config's is the one that counts
    assert _cli_ranges()["num_images"] == (1, None)


def test_vertex_ui_gets_the_configs_max_images() -> None:
    from sdxlctl.config import Config
    from sdxlctl.state import Resource
    from sdxlctl.vertex.ui import _ui_env

    endpoint = Resource(kind="endpoint", name="projects/p/locations/l/endpoints/1", target="vertex")
    env = _ui_env(endpoint, Config.model_validate({"model": {"max_images": 3}}))
    assert env["SDXL_UI_MAX_IMAGES"] == "3"


def test_the_ui_is_told_the_endpoints_byte_limit_and_whether_it_has_a_refiner() -> None:
    """A Vertex AI endpoint proxies only predict: what the page cannot ask the server, sdxlctl passes."""
    from sdxlctl.config import Config
    from sdxlctl.local import processes as local
    from sdxlctl.state import Resource
    from sdxlctl.vertex.names import container_env
    from sdxlctl.vertex.ui import _ui_env

    for dedicated in (False, True):
        config = Config.model_validate(
            {"gcp": {"project": "p"}, "deploy": {"endpoint": "dedicated" if dedicated else "shared"}}
        )
        endpoint = Resource(
            kind="endpoint",
            name="projects/p/locations/l/endpoints/1",
            target="vertex",
            details={"dedicated": dedicated},
        )
        env = _ui_env(endpoint, config)
        assert env["SDXL_UI_MAX_REQUEST_BYTES"] == container_env(config)["SDXL_MAX_REQUEST_BYTES"]
        assert env["SDXL_UI_REFINER"] == "0"
    refined = Config.model_validate({"model": {"refiner": "tiny", "source": "tiny"}})
    assert _ui_env(endpoint, refined)["SDXL_UI_REFINER"] == "1"
    assert local.ui_spec(refined, "http://127.0.0.1:1").env["SDXL_UI_REFINER"] == "1"


def test_more_images_than_max_images_names_the_config_key(cli: Cli) -> None:
    result = cli("predict", "a fox", "-n", "5")
    assert result.code == 2
    assert "[model] max_images" in result.err and "4" in result.err
    assert "SDXL_MAX_IMAGES" not in result.err and "Traceback" not in result.err
    # raised in the config, -n 5 is no longer refused for its count (here: nothing is deployed)
    allowed = cli("predict", "a fox", "-n", "5", env={"SDXLCTL_MODEL_MAX_IMAGES": "5"})
    assert allowed.code == 1 and "max_images" not in allowed.err


def test_more_images_than_max_images_in_a_subprocess_at_80_columns(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}
    result = subprocess.run(
        [sys.executable, "-m", "sdxlctl", "predict", "a fox", "-n", "16"],
        cwd=tmp_path,
        env={**env, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "[model] max_images" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["0", "many"])
def test_a_bad_max_images_for_the_ui_is_one_line(value: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sdxl_ui"],
        env={**os.environ, "SDXL_UI_MAX_IMAGES": value, "PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "SDXL_UI_MAX_IMAGES" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "body",
    [
        {"instances": [{"prompt": "a fox"}], "parameters": {"num_images": 3}},
        {"instances": [{"prompt": "a fox"}] * 3},
    ],
)
def test_the_servers_refusal_names_the_config_key_too(body: dict[str, Any]) -> None:
    """An endpoint deployed with a smaller max_images than the config now says: the CLI cannot check that."""
    import json

    from sdxl_server.errors import InvalidRequest
    from sdxl_server.schema import parse_request

    with pytest.raises(InvalidRequest, match=r"at most 2 .*\[model\] max_images"):
        parse_request(json.dumps(body).encode(), max_images=2, default_size=(64, 64), draw_seed=lambda: 1)


def test_samplers_refine_modes_strengths_and_the_byte_limit_are_the_servers() -> None:
    from sdxl_server import modes, schema
    from sdxl_server.schedulers import SCHEDULERS
    from sdxl_server.settings import Settings
    from sdxl_ui import limits

    assert [key for key, _ in limits.SCHEDULERS] == list(schema.SCHEDULER_NAMES) == list(SCHEDULERS)
    assert limits.DEFAULT_SCHEDULER == "euler"  # SDXL 1.0's own
    # the page says which samplers take twice the time a step
    assert {key for key, name in limits.SCHEDULERS if "x2" in name} == {
        key for key, sampler in SCHEDULERS.items() if sampler.unet_calls == 2
    }
    assert [key for key, _ in limits.REFINE_MODES] == list(schema.REFINE_MODES)
    assert limits.DEFAULT_STRENGTH == modes.DEFAULT_STRENGTH
    assert Settings().max_request_bytes == limits.DEFAULT_MAX_REQUEST_BYTES
