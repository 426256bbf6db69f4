"""Settings come from the environment, each with a default; bad values name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxl_server.errors import SettingsError
from sdxl_server.lora.sources import parse_preloaded
from sdxl_server.settings import Settings


def test_defaults_meet_vertex_ai() -> None:
    settings = Settings.from_env({})
    assert (settings.http_port, settings.health_route, settings.predict_route) == (8080, "/health", "/predict")
    assert settings.host == "0.0.0.0"
    assert settings.time_limit_s < 60
    assert settings.max_response_bytes == settings.max_request_bytes == 1_500_000
    assert settings.model_source == "tiny"
    # Slow clients are dropped: every wait on a client has a limit, and so has the number of clients.
    assert 0 < settings.header_timeout_s <= 30 and 0 < settings.body_timeout_s < 60
    assert settings.keep_alive_s > 0 and 0 < settings.max_connections < 10_000


def test_vertex_variables_and_knobs_are_read() -> None:
    settings = Settings.from_env(
        {
            "AIP_HTTP_PORT": "7080",
            "AIP_HEALTH_ROUTE": "/ping",
            "AIP_PREDICT_ROUTE": "/v1/predict",
            "SDXL_QUEUE_SIZE": "0",
            "SDXL_TIME_LIMIT": "30.5",
            "SDXL_MAX_RESPONSE_BYTES": "10000000",
            "SDXL_MAX_IMAGES": "8",
            "SDXL_WARMUP": "1024x1024, 768x1344",
            "SDXL_LOG_PROMPTS": "yes",
            "SDXL_DTYPE": "BF16",
            "SDXL_CACHE_DIR": "/tmp/c",
            "SDXL_HEADER_TIMEOUT": "2.5",
            "SDXL_BODY_TIMEOUT": "12",
            "SDXL_KEEP_ALIVE": "9",
            "SDXL_MAX_CONNECTIONS": "64",
        }
    )
    assert (settings.header_timeout_s, settings.body_timeout_s, settings.keep_alive_s) == (2.5, 12.0, 9)
    assert settings.max_connections == 64
    assert (settings.http_port, settings.health_route, settings.predict_route) == (7080, "/ping", "/v1/predict")
    assert (settings.queue_size, settings.time_limit_s, settings.max_images) == (0, 30.5, 8)
    assert settings.warmup == ((1024, 1024), (768, 1344))
    assert settings.log_prompts and settings.dtype == "bf16" and settings.cache_dir == Path("/tmp/c")


def test_model_source_prefers_sdxl_model_then_the_vertex_artifact() -> None:
    assert Settings.from_env({"AIP_STORAGE_URI": "gs://b/m"}).model_source == "gs://b/m"
    assert Settings.from_env({"AIP_STORAGE_URI": "gs://b/m", "SDXL_MODEL": "random-sdxl"}).model_source == "random-sdxl"
    assert Settings.from_env({"AIP_STORAGE_URI": ""}).model_source == "tiny"
    assert Settings.from_env({"SDXL_WARMUP": "none"}).warmup == ()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("AIP_HTTP_PORT", "http"),
        ("AIP_HTTP_PORT", "0"),
        ("AIP_HEALTH_ROUTE", "health"),
        ("SDXL_QUEUE_SIZE", "-1"),
        ("SDXL_TIME_LIMIT", "0"),
        ("SDXL_DTYPE", "int8"),
        ("SDXL_WARMUP", "1024"),
        ("SDXL_WARMUP", "1024x1000,1023x1024"),  # SDXL's sides are multiples of 8
        ("SDXL_LOG_PROMPTS", "maybe"),
        ("SDXL_MAX_IMAGES", "many"),
        ("SDXL_BODY_TIMEOUT", "0"),
        ("SDXL_HEADER_TIMEOUT", "never"),
        ("SDXL_KEEP_ALIVE", "1.5"),
        ("SDXL_MAX_CONNECTIONS", "1"),
        ("SDXL_LORA_SOURCES", "http://169.254.169.254/"),
        ("SDXL_LORA_SOURCES", "gs://bkt/loras/,gs://bkt/../x/"),
        ("SDXL_LORA_SOURCES", "gs://BKT/loras/"),
        ("SDXL_LORAS", "pixel=gs://bkt/x.bin"),
        ("SDXL_LORAS", "pixel=gs://bkt/a.safetensors,PIXEL=gs://bkt/b.safetensors"),
        ("SDXL_LORAS", "gs://bkt/a.safetensors"),
        ("SDXL_LORAS", "p=./x.safetensors"),
        ("SDXL_LORA_MAX_BYTES", "0"),
        ("SDXL_LORA_MAX_RANK", "0"),
        ("SDXL_LORA_MAX_RANK", "1025"),
        ("SDXL_LORA_MAX_RANK", "64.5"),
        ("SDXL_LORA_CACHE_BYTES", "-1"),
        ("SDXL_LORA_MEMORY", "0"),
    ],
)
def test_a_bad_value_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({var: value})
    assert raised.value.field == var
    assert var in raised.value.message and repr(value) in raised.value.message


def test_lora_is_off_by_default_with_the_contracts_defaults() -> None:
    settings = Settings.from_env({})
    assert not settings.lora_enabled and (settings.lora_sources, settings.loras) == ("", "")
    assert (settings.lora_max_bytes, settings.lora_max_rank) == (1_000_000_000, 64)
    assert (settings.lora_cache_bytes, settings.lora_memory) == (10_000_000_000, 8)
    assert not Settings.from_env({"SDXL_LORA_SOURCES": " , ", "SDXL_LORAS": ","}).lora_enabled  # names nothing


def test_lora_settings_are_read_and_the_sources_kept_canonical() -> None:
    settings = Settings.from_env(
        {
            "SDXL_LORA_SOURCES": " gs://bkt/loras , hf://org",
            "SDXL_LORA_MAX_BYTES": "5000",
            "SDXL_LORA_MAX_RANK": "1024",
            "SDXL_LORA_CACHE_BYTES": "9000",
            "SDXL_LORA_MEMORY": "2",
        }
    )
    assert settings.lora_enabled and settings.lora_sources == "gs://bkt/loras/,hf://org/"
    assert (settings.lora_max_bytes, settings.lora_max_rank, settings.lora_cache_bytes, settings.lora_memory) == (
        5000,
        1024,
        9000,
        2,
    )
    preloaded = Settings.from_env({"SDXL_LORAS": "Pixel=gs://bkt/p.safetensors,local=/srv/l/"})
    assert preloaded.lora_enabled and preloaded.lora_sources == ""
    assert parse_preloaded(preloaded.loras)["pixel"].uri == "gs://bkt/p.safetensors"  # what the service reads


def test_a_bad_lora_setting_stops_the_server_at_start_with_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "SDXL_LORA_SOURCES": "gs://bkt/loras/,https://evil.example/", "SDXL_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "sdxl_server"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "SDXL_LORA_SOURCES" in done.stderr and "https://evil.example/" in done.stderr
    assert "Traceback" not in done.stderr
