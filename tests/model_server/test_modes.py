"""Every generation mode against plain diffusers, built the way its docs build it: same tiny weights,
same seed, the same pixels within rounding (2/255)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    UniPCMultistepScheduler,
)

from sdxl_server import optimize
from sdxl_server.app import create_app
from sdxl_server.errors import TimeLimitExceeded
from sdxl_server.generator import Generator, to_pil
from sdxl_server.modes import MODES
from sdxl_server.refiner import build_tiny_refiner
from sdxl_server.schema import SCHEDULER_NAMES, Job, Request, parse_request
from sdxl_server.settings import Settings
from sdxl_server.sources import build_tiny_pipeline
from tests.servers import serve_app

TOLERANCE = 2  # of 255
PROMPT, SEED, STEPS, SIDE, GUIDANCE = "a lighthouse at dusk", 7, 4, 64, 5.0

# Written out, not taken from sdxl_server.schedulers: the mapping itself is under test.
DOCUMENTED: dict[str, tuple[Any, dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp_sde_karras": (DPMSolverSDEScheduler, {"use_karras_sigmas": True, "noise_sampler_seed": SEED}),
    "ddim": (DDIMScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
}


@pytest.fixture(scope="module")
def plain() -> Any:
    """The tiny base and refiner, as plain diffusers pipelines."""
    base = build_tiny_pipeline()
    base.set_progress_bar_config(disable=True)
    return base, build_tiny_refiner(base)


@pytest.fixture(scope="module")
def server(plain: Any) -> Generator:
    """What the server runs, on the same modules (it leaves the pipelines as it found them: a test below)."""
    base, refiner = plain
    return Generator(base, refiner=refiner, refiner_source="tiny")


@pytest.fixture(scope="module")
def default(server: Generator) -> np.ndarray:
    """The model's own sampler's image."""
    return served(server, request())


@pytest.fixture(scope="module")
def picture() -> PIL.Image.Image:
    rows = np.random.default_rng(3).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    return PIL.Image.fromarray(rows)


@pytest.fixture(scope="module")
def mask() -> PIL.Image.Image:
    mask = PIL.Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (16, 16, 48, 48))  # white = repaint
    return mask


def request(image: Any = None, mask: Any = None, seeds: tuple[int, ...] = (SEED,), **fields: Any) -> Request:
    job = Job(PROMPT, None, None, None, seeds, model_garden=False, image=image, mask=mask)
    return Request(
        (job,), steps=STEPS, guidance_scale=GUIDANCE, width=SIDE, height=SIDE, output_format="png", quality=90, **fields
    )


def served(generator: Generator, req: Request) -> np.ndarray:
    ((image, *_),) = generator.generate(req)
    return np.asarray(image).astype(int)


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def seed() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(SEED)


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_text_to_image_without_new_fields_is_what_it_was(server: Generator, plain: Any) -> None:
    """No scheduler, image or refine: the pipeline call of before issue 15, byte for byte."""
    base, _ = plain
    with torch.inference_mode():
        before = base(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            width=SIDE,
            height=SIDE,
            generator=[seed()],
            output_type="pt",
        )
    assert np.array_equal(served(server, request()), pixels(to_pil(before.images)[0]))


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_each_scheduler_matches_diffusers(server: Generator, plain: Any, default: np.ndarray, name: str) -> None:
    base, _ = plain
    cls, overrides = DOCUMENTED[name]
    loaded = base.scheduler
    base.scheduler = cls.from_config(loaded.config, **overrides)  # the diffusers docs' way
    try:
        theirs = base(
            PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIDE, height=SIDE, generator=seed()
        ).images[0]
    finally:
        base.scheduler = loaded
    ours = served(server, request(scheduler=name))
    assert_close(ours, pixels(theirs))
    assert base.scheduler is loaded  # the server put the loaded one back
    if name != "euler":  # the sampler was used, not the model's own (a tiny random UNet: small differences)
        assert np.abs(ours - default).max() > 0


@pytest.mark.parametrize("strength", [0.5, None])  # None: the default, 0.8
def test_image_to_image_matches_diffusers(server: Generator, plain: Any, picture: Any, strength: Any) -> None:
    base, _ = plain
    pipe = StableDiffusionXLImg2ImgPipeline(**base.components)
    theirs = pipe(
        PROMPT,
        image=picture,
        strength=strength or 0.8,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=seed(),
    )
    assert_close(served(server, request(picture, strength=strength)), pixels(theirs.images[0]))


def test_inpainting_matches_diffusers(server: Generator, plain: Any, picture: Any, mask: Any) -> None:
    base, _ = plain
    pipe = StableDiffusionXLInpaintPipeline(**base.components)
    theirs = pipe(
        PROMPT,
        image=picture,
        mask_image=mask,
        width=SIDE,
        height=SIDE,
        strength=1.0,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=seed(),
    ).images[0]
    ours = served(server, request(picture, mask))
    assert_close(ours, pixels(theirs))
    # Outside the mask the picture stays (within the VAE's round trip); inside it is repainted.
    outside, inside = np.asarray(mask) == 0, np.asarray(mask) == 255
    assert np.abs(ours - pixels(picture))[outside].mean() < np.abs(ours - pixels(picture))[inside].mean()


def test_expert_ensemble_matches_the_diffusers_docs(server: Generator, plain: Any, default: np.ndarray) -> None:
    base, refiner = plain
    generator = seed()
    latents = base(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        width=SIDE,
        height=SIDE,
        denoising_end=0.5,
        output_type="latent",
        generator=generator,
    ).images
    theirs = refiner(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        denoising_start=0.5,
        image=latents,
        generator=generator,
    )
    ours = served(server, request(refine="expert_ensemble", high_noise_frac=0.5))
    assert_close(ours, pixels(theirs.images[0]))
    assert np.abs(ours - default).max() > 0  # the refiner did the last steps


def test_base_image_refines_the_finished_image(server: Generator, plain: Any, picture: Any) -> None:
    base, refiner = plain
    generator = seed()
    latents = base(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        width=SIDE,
        height=SIDE,
        output_type="latent",
        generator=generator,
    ).images
    theirs = refiner(
        PROMPT, image=latents, strength=0.3, num_inference_steps=7, guidance_scale=GUIDANCE, generator=generator
    ).images[0]
    assert_close(served(server, request(refine="base_image", refine_steps=7)), pixels(theirs))
    # after image-to-image too
    generator = seed()
    img2img = StableDiffusionXLImg2ImgPipeline(**base.components)
    latents = img2img(
        PROMPT,
        image=picture,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        strength=0.8,
        output_type="latent",
        generator=generator,
    ).images
    theirs = refiner(
        PROMPT, image=latents, strength=0.3, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator
    ).images[0]
    assert_close(served(server, request(picture, refine="base_image")), pixels(theirs))


def test_a_batch_gives_each_seed_its_own_image(server: Generator) -> None:
    """Two seeds in one request: the images the two seeds give alone, through the refiner too, and with
    the SDE sampler, whose Brownian noise is seeded per image."""
    fields = {"scheduler": "dpmpp_sde_karras", "refine": "expert_ensemble"}
    (both,) = server.generate(request(seeds=(SEED, SEED + 1), **fields))
    alone = [served(server, request(seeds=(s,), **fields)) for s in (SEED, SEED + 1)]
    for image, reference in zip(both, alone, strict=True):
        assert_close(pixels(image), reference)
    assert np.abs(alone[0] - alone[1]).max() > 0


def test_the_modes_share_the_loaded_modules(server: Generator) -> None:
    """No weight is loaded or copied twice: every pipeline holds the base's module objects."""
    pipes, base = server.pipes, server.pipeline
    for pipe in (pipes.image, pipes.inpaint):
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            assert getattr(pipe, name) is getattr(base, name), name
    refiner = server.refiner
    assert pipes.refiner is refiner
    assert refiner is not None
    assert refiner.vae is base.vae and refiner.text_encoder_2 is base.text_encoder_2
    every = {id(p) for pipe in (base, pipes.image, pipes.inpaint, refiner) for p in _parameters(pipe)}
    assert every == {id(p) for p in _parameters(base)} | {id(p) for p in refiner.unet.parameters()}


def test_the_modes_keep_the_loaded_dtype() -> None:
    """from_pipe casts every module to float32 unless told otherwise, in place: fp16 weights would double."""
    base = build_tiny_pipeline().to(torch.bfloat16)  # the server's fp16, in a dtype a CPU runs
    pipes = Generator(base).pipes
    assert {pipe.unet.dtype for pipe in (base, pipes.image, pipes.inpaint)} == {torch.bfloat16}
    assert base.text_encoder.dtype == base.vae.dtype == torch.bfloat16


def _parameters(pipe: Any) -> list[Any]:
    return [
        p for module in pipe.components.values() if isinstance(module, torch.nn.Module) for p in module.parameters()
    ]


def test_the_stop_check_counts_the_steps_of_both_models(server: Generator) -> None:
    """The time limit holds across both models: asked after each step of the base and of the refiner."""

    def stop_after(steps: int) -> Any:
        asked = []

        def stop() -> bool:
            asked.append(1)
            return len(asked) > steps

        return stop, asked

    ensemble = request(refine="expert_ensemble", high_noise_frac=0.5)
    stop, asked = stop_after(STEPS)
    server.generate(ensemble, stop)
    assert len(asked) == STEPS  # 2 steps of the base, 2 of the refiner
    with pytest.raises(TimeLimitExceeded, match="stopped after 1 of 2 steps of the refiner"):
        server.generate(ensemble, stop_after(2)[0])


def png64(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_app_serves_the_modes_and_health_lists_them(server: Generator, picture: Any) -> None:
    """Over HTTP, as a client sends it (hyphenated names, any case): the image the Generator gives for the
    request parse_request makes of the body."""
    body = {
        "instances": [{"prompt": PROMPT, "seed": SEED, "image": png64(picture)}],
        "parameters": {
            "num_inference_steps": STEPS,
            "guidance_scale": GUIDANCE,
            "scheduler": "DPMPP-2M-Karras",
            "strength": 0.5,
            "refine": "base-image",
            "output_format": "png",
        },
    }
    with serve_app(create_app(Settings(warmup=()), load=lambda _: server)) as http:
        health = http.wait_until("ready").json()
        response = http.predict(body)
    assert response.status_code == 200, response.text
    assert health["refiner"] == "tiny"
    assert health["modes"] == ["text-to-image", "image-to-image", "inpainting"]
    assert health["schedulers"] == list(SCHEDULER_NAMES)
    assert health["refine"] == ["none", "expert_ensemble", "base_image"]
    assert "compiled_modes" not in health  # not a compiled level
    encoded = response.json()["predictions"][0]["images"][0]
    got = pixels(PIL.Image.open(io.BytesIO(base64.b64decode(encoded))))
    parsed = parse_request(
        json.dumps(body).encode(), max_images=1, default_size=(256, 256), draw_seed=lambda: 0, refiner=True
    )
    assert (parsed.mode, parsed.scheduler, parsed.refine) == ("image-to-image", "dpmpp_2m_karras", "base_image")
    assert np.array_equal(got, served(server, parsed))


def test_a_server_without_a_refiner_says_so(plain: Any) -> None:
    base, _ = plain
    with serve_app(create_app(Settings(warmup=()), load=lambda _: Generator(base))) as http:
        health = http.wait_until("ready").json()
        refused = http.predict({"instances": [{"prompt": PROMPT}], "parameters": {"refine": "expert_ensemble"}})
    assert "refiner" not in health and health["refine"] == ["none"]
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["field"] == "parameters.refine" and "SDXL_REFINER" in error["message"]


@pytest.mark.timeout(900)  # compiles two tiny UNets: seconds alone, minutes on a loaded 2-core machine
@pytest.mark.usefixtures("fresh_compiler")
def test_a_compiled_level_compiles_every_mode_and_the_refiner_at_warm_up() -> None:
    """After warm-up at 64x64, each mode, the refiner both ways and another sampler run compiled code
    with nothing left to compile: torch's fail_on_recompile stance would raise otherwise."""
    base = build_tiny_pipeline()
    base.set_progress_bar_config(disable=True)
    refiner = build_tiny_refiner(base)
    for pipe in (base, refiner):
        optimize.apply(pipe, "compile")
    generator = Generator(base, optimize_level="compile", refiner=refiner, refiner_source="tiny")
    generator.warm_up(((SIDE, SIDE),))
    assert generator.compiled_modes == (*MODES, "refiner")
    assert refiner.unet.forward.frozen and base.unet.forward.frozen
    for forward in (base.unet.forward, refiner.unet.forward, base.vae.decoder.forward):
        forward.frozen = False  # or a shape without compiled code would run eagerly, unseen
    picture = PIL.Image.new("RGB", (SIDE, SIDE), (200, 40, 40))
    mask = PIL.Image.new("L", (SIDE, SIDE), 255)
    with torch.compiler.set_stance("fail_on_recompile"):
        for req in (
            request(),
            request(picture, strength=0.6),
            request(picture, mask),
            request(refine="expert_ensemble"),
            request(picture, refine="base_image"),
            request(scheduler="dpmpp_2m"),  # integer timesteps: the timestep embedding is not compiled
        ):
            generator.generate(req)


def test_cuda_graphs_take_integer_timesteps_as_float(plain: Any) -> None:
    """DPM++'s integer timesteps reach the UNet as float32, what warm-up's Euler captured graphs with
    (on a GPU; on a CPU the wrapper passes the call through): the image is the same."""
    base, _ = plain
    seen: list[torch.dtype] = []
    hook = base.unet.time_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    generator = Generator(base)
    try:
        before = served(generator, request(scheduler="dpmpp_2m"))
        assert set(seen) == {torch.int64}
        seen.clear()
        base.unet.forward = optimize.GraphedForward(base.unet.forward)
        assert np.array_equal(served(generator, request(scheduler="dpmpp_2m")), before)
        assert set(seen) == {torch.float32}
    finally:
        hook.remove()
        del base.unet.forward  # the class's own again
