"""sdxlctl predict --lora: the flag's syntax, what it sends, the usage errors before any request, and the
server's refusals named as the flag they came from (a scripted server on loopback: the real client)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdxlctl import loras
from sdxlctl.errors import UsageError
from sdxlctl.state import Resource, StateStore
from tests.cli.scripted import Answer, Script, scripted_server
from tests.conftest import Cli


@pytest.mark.parametrize(
    ("flag", "entry"),
    [
        ("gs://bucket/loras/x.safetensors:0.7", {"source": "gs://bucket/loras/x.safetensors", "scale": 0.7}),
        ("gs://bucket/loras/x.safetensors", {"source": "gs://bucket/loras/x.safetensors", "scale": 1.0}),
        ("gs://bucket/loras/", {"source": "gs://bucket/loras/", "scale": 1.0}),
        ("nerijs/pixel-art-xl", {"source": "hf://nerijs/pixel-art-xl", "scale": 1.0}),
        ("nerijs/pixel-art-xl:-0.5", {"source": "hf://nerijs/pixel-art-xl", "scale": -0.5}),
        ("hf://org/repo@v1/sub/x.safetensors:2", {"source": "hf://org/repo@v1/sub/x.safetensors", "scale": 2.0}),
        ("pixel-art:0.8", {"name": "pixel-art", "scale": 0.8}),
        ("Pixel-Art", {"name": "pixel-art", "scale": 1.0}),  # names are case-insensitive, as the server's
        ("style.v2:1e-1", {"name": "style.v2", "scale": 0.1}),
    ],
)
def test_a_flag_is_a_source_a_hub_repo_or_a_name_with_the_scale_after_the_last_colon(
    flag: str, entry: dict[str, Any]
) -> None:
    assert loras.parse_flag(flag).entry == entry


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["a", "b", "c", "d"], "at most 3 adapters"),
        (["pixel-art:5"], "scale 5 is not between -4 and 4"),
        (["pixel-art:nan"], "is not between"),
        (["./mine.safetensors"], "sdxlctl lora push FILE"),
        (["/abs/mine.safetensors:0.5"], "a local file"),
        (["pixel-art", "PIXEL-ART:0.5"], "give it once, with the sum of the scales"),
        (["bad name!"], "neither a source"),
        ([":0.5"], "no adapter given"),
    ],
)
def test_bad_flags_are_usage_errors(flags: list[str], said: str) -> None:
    with pytest.raises(UsageError, match=None) as raised:
        loras.parse_flags(flags)
    assert said in raised.value.message + " " + (raised.value.hint or "")


def _deployed(folder: Path, script: Script) -> None:
    """Record a local server that is in fact the scripted loopback server."""
    url = script.url.removesuffix("/predict")
    with StateStore(folder / ".sdxlctl").transaction() as state:
        state.put("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", url=url, details={}))


def refusal(status: int, field: str, message: str) -> Answer:
    return Answer(status=status, body={"error": {"code": status, "message": message, "field": field}})


def test_three_flags_are_sent_as_parameters_lora_a_list(cli: Cli, tmp_path: Path) -> None:
    with scripted_server() as script:
        script.answers = [Answer()]
        _deployed(tmp_path, script)
        args = ["--lora", "gs://b/loras/x.safetensors:0.7", "--lora", "org/repo", "--lora", "pixel-art:-1"]
        result = cli("predict", "a fox", "-o", "fox.png", *args)
    assert result.code == 0, result.err
    assert script.seen[0]["parameters"]["lora"] == [
        {"source": "gs://b/loras/x.safetensors", "scale": 0.7},
        {"source": "hf://org/repo", "scale": 1.0},
        {"name": "pixel-art", "scale": -1.0},
    ]


def test_without_lora_the_request_is_as_it_was(cli: Cli, tmp_path: Path) -> None:
    with scripted_server() as script:
        script.answers = [Answer()]
        _deployed(tmp_path, script)
        assert cli("predict", "a fox", "-o", "fox.png").code == 0
    assert script.seen == [
        {"instances": [{"prompt": "a fox"}], "parameters": {"num_images": 1, "output_format": "png"}}
    ]


def test_usage_errors_send_nothing(cli: Cli, tmp_path: Path) -> None:
    with scripted_server() as script:
        script.answers = [Answer()]
        _deployed(tmp_path, script)
        four = [arg for name in "abcd" for arg in ("--lora", name)]
        result = cli("predict", "a fox", "-o", "fox.png", *four)
        twice = cli("predict", "a fox", "-o", "fox.png", "--lora", "a:0.5", "--lora", "a:0.2")
    assert result.code == 2 and "--lora given 4 times" in result.err
    assert twice.code == 2 and "give it once, with the sum of the scales" in twice.err
    assert script.seen == [] and not (tmp_path / "fox.png").exists()


@pytest.mark.parametrize(
    ("status", "field", "message", "shown", "hint"),
    [
        (
            403,
            "parameters.lora[1].source",
            "LoRA sources are not allowed on this server: its operator sets SDXL_LORA_SOURCES "
            "(sdxlctl: [model] lora_sources)",
            "--lora #2 (org/repo:0.5): the server answered 403: LoRA sources are not allowed",
            'allow its prefix: [model] lora_sources = ["gs://BUCKET/loras/"]',
        ),
        (
            403,
            "parameters.lora[0].source",
            "parameters.lora[0].source: gs://other/x.safetensors is not under an allowed prefix (SDXL_LORA_SOURCES)",
            "--lora #1 (gs://other/x.safetensors): the server answered 403: gs://other/x.safetensors is not under",
            "sdxlctl lora push FILE",
        ),
        (
            403,
            "parameters.lora[2].name",
            "LoRA adapters are off on this server: its operator preloads named adapters with SDXL_LORAS",
            "--lora #3 (nope): the server answered 403: LoRA adapters are off on this server",
            'preload it: [model] loras = { NAME = "gs://',
        ),
        (
            400,
            "parameters.lora[2].name",
            "no preloaded adapter 'nope'; preloaded: pixel-art",
            "--lora #3 (nope): the server answered 400: no preloaded adapter 'nope'",
            "add it to [model] loras",
        ),
        (
            400,
            "parameters.lora",
            "ranks 64 + 32 = 96 exceed SDXL_LORA_MAX_RANK=64, the rank the server prepared for hot-swap",
            "--lora: the server answered 400: ranks 64 + 32 = 96 exceed SDXL_LORA_MAX_RANK=64",
            "raise [model] lora_max_rank",
        ),
    ],
)
def test_a_refusal_names_the_flag_it_came_from(
    cli: Cli, tmp_path: Path, status: int, field: str, message: str, shown: str, hint: str
) -> None:
    with scripted_server() as script:
        script.answers = [refusal(status, field, message)]
        _deployed(tmp_path, script)
        result = cli(
            "predict", "a fox", "-o", "fox.png",
            "--lora", "gs://other/x.safetensors", "--lora", "org/repo:0.5", "--lora", "nope",
        )  # fmt: skip
    assert result.code == 1
    lines = result.err.splitlines()
    assert lines[0].startswith("error: " + shown), result.err
    assert lines[1].startswith("hint: ") and hint in lines[1], result.err
    assert len(lines) == 2 and "Traceback" not in result.err


def test_a_refusal_of_another_field_is_shown_as_before(cli: Cli, tmp_path: Path) -> None:
    with scripted_server() as script:
        script.answers = [refusal(400, "parameters.width", "width must be a multiple of 8")]
        _deployed(tmp_path, script)
        result = cli("predict", "a fox", "-o", "fox.png", "--lora", "pixel-art")
    assert result.code == 1
    assert result.err.splitlines()[0] == "error: the server answered 400: width must be a multiple of 8"


def test_a_vertex_ai_error_carrying_the_servers_body_is_named_too() -> None:
    """Vertex AI hands the model server's JSON body on inside its own message (as the emulator does)."""
    from sdxlctl.gcp.errors import CloudError

    body = '{"error": {"code": 403, "message": "x is not under an allowed prefix (SDXL_LORA_SOURCES)", '
    body += '"field": "parameters.lora[0].source"}}'
    flags = loras.parse_flags(["gs://b/x.safetensors:0.5"])
    shown = loras.explained(CloudError(f"predict: {body}"), flags)
    assert shown.message == (
        "--lora #1 (gs://b/x.safetensors:0.5): the server answered 403: "
        "x is not under an allowed prefix (SDXL_LORA_SOURCES)"
    )
    other = CloudError("predict: Endpoint e does not have any deployed models.")
    assert loras.explained(other, flags) is other
