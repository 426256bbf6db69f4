"""[model] as the model server's environment: the one translation both targets start it with."""

from __future__ import annotations

from sdxlctl.config import Model


def server_env(
    model: Model,
    *,
    auto_cache: str = "",
    time_limit_s: float | None = None,
    byte_limit: int | None = None,
    with_source: bool = True,
    baked_folder: str = "",
) -> dict[str, str]:
    """The SDXL_* variables for `model`; the arguments say what differs where the server runs.

    `auto_cache`: what compile_cache = "auto" means there ("" leaves it to the server's own folder);
    `time_limit_s`: a tighter limit than [model] time_limit_s, where the endpoint cuts requests sooner;
    `byte_limit`: request and response bytes the endpoint carries; `with_source`: False where the weights
    reach the server another way (as the Vertex AI Model's artifact); `baked_folder`: where the image holds
    the weights and the VAE [model] bake put in at build time, which it then loads, fetching nothing.
    """
    env = {}
    if with_source:
        env["SDXL_MODEL"] = model.source
    env |= {
        "SDXL_VAE": model.vae,
        "SDXL_DTYPE": model.dtype,
        "SDXL_QUEUE_SIZE": str(model.queue_size),
        "SDXL_TIME_LIMIT": str(model.time_limit_s if time_limit_s is None else time_limit_s),
        "SDXL_MAX_IMAGES": str(model.max_images),
    }
    if byte_limit is not None:
        env["SDXL_MAX_REQUEST_BYTES"] = env["SDXL_MAX_RESPONSE_BYTES"] = str(byte_limit)
    env["SDXL_OPTIMIZE"] = model.optimize
    if model.warmup:
        env["SDXL_WARMUP"] = ",".join(model.warmup)
    if model.refiner != "off":  # absent is off: a deployment without one keeps its container spec as it was
        env["SDXL_REFINER"] = model.refiner  # never baked: with bake = true the server still fetches it at start
    if baked_folder and model.bake:
        env["SDXL_MODEL"], env["SDXL_VAE"] = baked_folder, "model"
    if cache := compile_cache(model, auto_cache):
        env["SDXL_COMPILE_CACHE"] = cache
    return env | lora_env(model)


def lora_env(model: Model) -> dict[str, str]:
    """SDXL_LORA_*: absent when LoRA is off, so a deployment without it keeps the container spec it had."""
    env = {}
    if model.lora_sources:
        env["SDXL_LORA_SOURCES"] = ",".join(model.lora_sources)
    if model.loras:
        env["SDXL_LORAS"] = ",".join(f"{name}={source}" for name, source in model.loras.items())
    default_rank = Model.model_fields["lora_max_rank"].default
    if env and model.lora_max_rank != default_rank:  # the rank only matters to a server with LoRA on
        env["SDXL_LORA_MAX_RANK"] = str(model.lora_max_rank)
    return env


def compile_cache(model: Model, auto_cache: str = "") -> str:
    """Where the server keeps compiled code; "" for its own folder, or when it compiles nothing."""
    if model.optimize in ("none", "eager") or model.compile_cache == "none":
        return ""
    return auto_cache if model.compile_cache == "auto" else model.compile_cache
