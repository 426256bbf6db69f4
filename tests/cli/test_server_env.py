"""[model] becomes the model server's environment in one place: both targets give it the same variables."""

from __future__ import annotations

from sdxlctl.config import Config
from sdxlctl.local import processes as local
from sdxlctl.vertex.names import container_env

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
