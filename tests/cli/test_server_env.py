"""[model] becomes the model server's environment in one place: both targets give it the same variables."""

from __future__ import annotations

from sdxlctl.config import Config
from sdxlctl.local import processes as local
from sdxlctl.state import Resource
from sdxlctl.vertex.names import container_env
from sdxlctl.vertex.ui import _ui_env

MODEL = {
    "source": "stabilityai/stable-diffusion-xl-base-1.0",
    "vae": "model",
    "dtype": "bf16",
    "queue_size": 7,
    "time_limit_s": 300,
    "max_images": 3,
    "optimize": "compile",
    "warmup": ["768x1344"],
    "compile_cache": "/srv/compile-cache",
}


def config(**model: object) -> Config:
    return Config.model_validate(
        {"gcp": {"project": "p"}, "model": {**MODEL, **model}, "deploy": {"endpoint": "dedicated"}}
    )


def test_both_targets_tell_the_server_the_same() -> None:
    here = local.server_spec(config()).env
    there = container_env(config())
    # What only the place adds: where to listen on this machine; what an endpoint carries.
    assert {k: v for k, v in here.items() if k not in ("SDXL_HOST", "AIP_HTTP_PORT")} == {
        k: v for k, v in there.items() if not k.startswith("SDXL_MAX_RE")
    }


def test_a_server_that_compiles_nothing_gets_no_compile_cache_on_either_target() -> None:
    for optimize in ("none", "eager"):
        assert "SDXL_COMPILE_CACHE" not in local.server_spec(config(optimize=optimize)).env
        assert "SDXL_COMPILE_CACHE" not in container_env(config(optimize=optimize))


def test_a_shared_endpoint_cuts_the_time_limit_and_the_local_server_does_not() -> None:
    shared = config().model_copy(update={"deploy": config().deploy.model_copy(update={"endpoint": "shared"})})
    assert container_env(shared)["SDXL_TIME_LIMIT"] == "55.0"
    assert local.server_spec(shared).env["SDXL_TIME_LIMIT"] == "300.0"


def test_only_a_baked_image_loads_the_baked_folder() -> None:
    baked = config(bake=True)
    assert container_env(baked)["SDXL_MODEL"] == "/models/sdxl" and container_env(baked)["SDXL_VAE"] == "model"
    assert local.server_spec(baked).env["SDXL_MODEL"] == MODEL["source"]  # this machine runs no image


# ---------------------------------------------------------------- LoRA (issue 16)

OLD = {"source": "stabilityai/stable-diffusion-xl-base-1.0", "refiner": "random", "warmup": ["768x1344"]}
PIXEL = "gs://team-loras/loras/pixel-art.safetensors"


def test_a_config_without_lora_gives_both_targets_exactly_the_environment_it_had() -> None:
    """What a deployment of before LoRA was started with: an unchanged container spec uploads no new version."""
    old = Config.model_validate({"gcp": {"project": "p"}, "model": OLD})
    common = {
        "SDXL_MODEL": OLD["source"],
        "SDXL_VAE": "auto",
        "SDXL_DTYPE": "auto",
        "SDXL_QUEUE_SIZE": "4",
        "SDXL_TIME_LIMIT": "55.0",
        "SDXL_MAX_IMAGES": "4",
        "SDXL_OPTIMIZE": "auto",
        "SDXL_WARMUP": "768x1344",
        "SDXL_REFINER": "random",
    }
    assert container_env(old) == {
        **common,
        "SDXL_MAX_REQUEST_BYTES": "1500000",
        "SDXL_MAX_RESPONSE_BYTES": "1500000",
        "SDXL_COMPILE_CACHE": "gs://p-sdxlctl/compile-cache/sdxl",
    }
    assert local.server_spec(old).env == {**common, "SDXL_HOST": "127.0.0.1", "AIP_HTTP_PORT": "8080"}
    endpoint = Resource(kind="endpoint", name="projects/p/locations/r/endpoints/1", target="vertex")
    assert _ui_env(endpoint, old) == {
        "SDXL_ENDPOINT": endpoint.name,
        "SDXL_UI_MAX_IMAGES": "4",
        "SDXL_UI_MAX_REQUEST_BYTES": "1500000",
        "SDXL_UI_REFINER": "1",
    }
    assert "SDXL_UI_LORAS" not in local.ui_spec(old, "http://127.0.0.1:8080").env
    # A rank alone changes nothing: it matters only to a server with LoRA on.
    ranked = Config.model_validate({"gcp": {"project": "p"}, "model": {**OLD, "lora_max_rank": 16}})
    assert container_env(ranked) == container_env(old) and local.server_spec(ranked).env == local.server_spec(old).env


def test_both_targets_tell_the_server_and_the_ui_the_lora_keys() -> None:
    lora = config(
        lora_sources=["gs://team-loras/loras", "hf://some-org/"],
        loras={"Pixel-Art": PIXEL, "ink": "hf://some-org/ink-lora@v2/ink.safetensors"},
        lora_max_rank=96,
    )
    wanted = {
        "SDXL_LORA_SOURCES": "gs://team-loras/loras/,hf://some-org/",
        "SDXL_LORAS": f"pixel-art={PIXEL},ink=hf://some-org/ink-lora@v2/ink.safetensors",
        "SDXL_LORA_MAX_RANK": "96",
    }
    for env in (local.server_spec(lora).env, container_env(lora)):
        assert {k: v for k, v in env.items() if k.startswith("SDXL_LORA")} == wanted
    default_rank = config(lora_sources=["hf://some-org/"])
    assert "SDXL_LORA_MAX_RANK" not in container_env(default_rank)
    assert "SDXL_LORAS" not in container_env(default_rank)  # nothing preloaded: not set
    only_preloaded = container_env(config(loras={"pixel": PIXEL}))
    assert "SDXL_LORA_SOURCES" not in only_preloaded and only_preloaded["SDXL_LORAS"] == f"pixel={PIXEL}"

    # The UI's adapter menu: the names, in the config's order, on both targets.
    endpoint = Resource(kind="endpoint", name="projects/p/locations/r/endpoints/1", target="vertex")
    assert _ui_env(endpoint, lora)["SDXL_UI_LORAS"] == "pixel-art,ink"
    assert local.ui_spec(lora, "http://127.0.0.1:8080").env["SDXL_UI_LORAS"] == "pixel-art,ink"
    assert "SDXL_UI_LORAS" not in _ui_env(endpoint, default_rank)
