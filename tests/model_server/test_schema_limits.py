"""Every limit of the request schema, exactly at it and one past it, and the seed rule."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sdxl_server.errors import InvalidRequest
from sdxl_server.schema import MAX_SEED, Request, parse_request

MAX_IMAGES = 4


def parse(body: Any, *, draw: int = 7) -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, max_images=MAX_IMAGES, default_size=(1024, 1024), draw_seed=lambda: draw)


def refused(body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        parse(body)
    return raised.value


def body(instance: dict[str, Any] | None = None, **parameters: Any) -> dict[str, Any]:
    return {"instances": [{"prompt": "a fox", **(instance or {})}], "parameters": parameters}


# (parameter, accepted values at the limits, refused values one past them)
PARAMETER_LIMITS: list[tuple[str, list[Any], list[Any]]] = [
    ("num_inference_steps", [1, 150], [0, 151]),
    ("guidance_scale", [0, 0.0, 30, 30.0], [-0.001, 30.001, 31]),
    ("width", [64, 72, 2040, 2048], [56, 63, 65, 2049, 2056]),
    ("height", [64, 2048], [56, 2056, 1020]),
    ("quality", [1, 100], [0, 101]),
    ("num_images", [1, MAX_IMAGES], [0, MAX_IMAGES + 1]),
]


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, ok, _ in PARAMETER_LIMITS for value in ok], ids=str
)
def test_a_parameter_exactly_at_its_limit_is_accepted(name: str, value: Any) -> None:
    request = parse(body(**{name: value}))
    attribute = {"num_inference_steps": "steps", "num_images": None}.get(name, name)
    if attribute is None:
        assert request.num_images == value
    else:
        assert getattr(request, attribute) == value


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, _, bad in PARAMETER_LIMITS for value in bad], ids=str
)
def test_a_parameter_one_past_its_limit_is_refused_naming_it(name: str, value: Any) -> None:
    error = refused(body(**{name: value}))
    assert error.field == f"parameters.{name}"
    assert name in error.message


def test_prompts_of_exactly_2000_characters_pass_and_2001_do_not() -> None:
    for field in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
        assert parse(body({field: "x" * 2000}))
        error = refused(body({field: "x" * 2001}))
        assert error.field == f"instances[0].{field}" and "2000" in error.message
    assert parse(body(negative_prompt="x" * 2000))
    assert refused(body(negative_prompt="x" * 2001)).field == "parameters.negative_prompt"


def test_seeds_from_0_to_2_pow_32_minus_1() -> None:
    assert parse(body({"seed": 0})).jobs[0].seeds == (0,)
    assert parse(body({"seed": MAX_SEED})).jobs[0].seeds == (2**32 - 1,)
    assert MAX_SEED == 2**32 - 1
    for bad in (-1, 2**32, 2**53 + 1, 2**64):
        assert refused(body({"seed": bad})).field == "instances[0].seed"


def test_image_seeds_wrap_to_0_so_every_returned_seed_is_accepted_back() -> None:
    request = parse(body({"seed": MAX_SEED}, num_images=3))
    assert request.jobs[0].seeds == (MAX_SEED, 0, 1)
    for seed in request.jobs[0].seeds:
        assert parse(body({"seed": seed})).jobs[0].seeds == (seed,)
    drawn = parse(body(num_images=2), draw=MAX_SEED)
    assert drawn.jobs[0].seeds == (MAX_SEED, 0)


def test_max_images_counts_instances_times_num_images() -> None:
    assert parse({"instances": [{"prompt": "a"}] * 2, "parameters": {"num_images": 2}}).num_images == 4
    error = refused({"instances": [{"prompt": "a"}] * 2, "parameters": {"num_images": 3}})
    assert error.field == "parameters.num_images" and "at most 4" in error.message
    assert parse({"instances": [{"prompt": "a"}] * MAX_IMAGES}).num_images == MAX_IMAGES
    assert refused({"instances": [{"prompt": "a"}] * (MAX_IMAGES + 1)}).field == "instances"


def test_the_instance_count_is_checked_before_any_instance_is_validated() -> None:
    """350,000 empty instances: refused for their number, not after validating each (issue 12, point 1)."""
    error = refused(b'{"instances":[' + b",".join([b"{}"] * 350_000) + b"]}")
    assert error.field == "instances"
    assert "350000 instances" in error.message and "at most 4" in error.message


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"[" * 100_000, "nested"),
        (b'{"instances":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested"),
        (b'{"instances":[{"prompt":"a","x":[[[[[[[[[[1]]]]]]]]]]}]}', "nested"),
        (b'{"instances":[{"prompt":"a","seed":' + b"9" * 5000 + b"}]}", "not valid JSON"),
        (b'{"instances":[{"prompt":"a","seed":NaN}]}', "not valid JSON"),
        (b'{"instances":[{"prompt":"a"}],"parameters":{"guidance_scale":Infinity}}', "not valid JSON"),
        (b'{"instances":[{"prompt":"a"}],"parameters":{"guidance_scale":-Infinity}}', "not valid JSON"),
        (b"", "not valid JSON"),
    ],
    ids=[
        "brackets",
        "deep-instances",
        "deep-objects",
        "depth-11",
        "5000-digits",
        "nan",
        "infinity",
        "-infinity",
        "empty",
    ],
)
def test_malformed_json_of_every_kind_is_a_400_on_the_body(raw: bytes, why: str) -> None:
    error = refused(raw)
    assert error.status == 400 and error.field == "body"
    assert why in error.message


def test_huge_numbers_are_out_of_range_not_errors() -> None:
    assert refused(body(guidance_scale=1e308)).field == "parameters.guidance_scale"
    assert refused(b'{"instances":[{"prompt":"a"}],"parameters":{"guidance_scale":1e999}}').field == (
        "parameters.guidance_scale"
    )
    assert refused(body({"seed": 1e300})).field == "instances[0].seed"
    assert refused(body(num_inference_steps=2**64)).field == "parameters.num_inference_steps"


def test_model_garden_shape_in_full() -> None:
    request = parse(
        {
            "instances": [{"text": "a fox"}, {"text": "a cat", "negative_prompt": "dogs"}],
            "parameters": {
                "negative_prompt": "blurry",
                "height": 512,
                "width": 768,
                "num_inference_steps": 20,
                "guidance_scale": 7.5,
            },
        }
    )
    assert [job.negative_prompt for job in request.jobs] == ["blurry", "dogs"]  # the instance's own wins
    assert all(job.model_garden for job in request.jobs)
    assert (request.width, request.height, request.steps, request.guidance_scale) == (768, 512, 20, 7.5)


def test_lora_limits_at_them_and_one_past() -> None:
    source = "gs://bkt/loras/x.safetensors"
    at_limits = body(lora=[{"source": source, "scale": -4}, {"name": "a", "scale": 4}, {"name": "b", "scale": 0}])
    assert [ref.scale for ref in parse(at_limits).loras] == [-4.0, 4.0, 0.0]
    assert refused(body(lora=[{"name": n} for n in "abcd"])).field == "parameters.lora"  # 4 adapters
    for scale in (-4.001, 4.001):
        assert refused(body(lora={"name": "a", "scale": scale})).field == "parameters.lora[0].scale"
    long_source = "gs://bkt/" + "x" * (1024 - len("gs://bkt/") - len(".safetensors")) + ".safetensors"
    assert parse(body(lora={"source": long_source})).loras[0].source is not None  # 1024 characters
    assert refused(body(lora={"source": long_source.replace("gs://", "gs://a")})).field == "parameters.lora[0].source"


def test_lora_id_in_an_instance_is_refused_pointing_to_parameters() -> None:
    error = refused(body({"lora_id": "x"}))
    assert error.field == "instances[0].lora_id" and "parameters.lora_id" in error.message


def test_a_body_of_exactly_the_byte_limit_is_read_and_one_byte_more_is_413(tiny_pipeline) -> None:
    import httpx

    from sdxl_server.app import create_app
    from sdxl_server.generator import Generator
    from sdxl_server.settings import Settings
    from tests.servers import serve_app

    limit = 2000
    app = create_app(Settings(max_request_bytes=limit, warmup=((64, 64),)), load=lambda _: Generator(tiny_pipeline))

    def body(size: int) -> bytes:
        start = b'{"instances": [{"prompt": "'
        end = b'"}], "parameters": {"width": 7}}'  # refused after reading: 400 on width, not 413
        return start + b"x" * (size - len(start) - len(end)) + end

    with serve_app(app) as server:
        server.wait_until("ready")
        url = server.url + server.predict_route
        for chunked in (False, True):  # declared up front, or found out while reading
            for size, status in ((limit, 400), (limit + 1, 413)):
                content = body(size)
                assert len(content) == size
                sent = iter([content[:1000], content[1000:]]) if chunked else content
                response = httpx.post(url, content=sent, timeout=30)
                assert response.status_code == status, (chunked, size, response.text)
                assert response.json()["error"]["field"] == ("parameters.width" if status == 400 else "body")


# Issue 15: the generation modes' parameters.
PNG_64 = (  # 64x64, one colour
    "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAYElEQVR4nO3PQQ0AIBDAMED5SUcEj4ZkVbDtNbN+dnTAqwa0BrQGtAa0BrQGtAa0"
    "BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0C4FEAYCt2yLnAAAAAElFTkSuQmCC"
)


def image_body(**parameters: Any) -> dict[str, Any]:
    return {"instances": [{"prompt": "a fox", "image": PNG_64}], "parameters": parameters}


def parse_with(payload: Any, *, refiner: bool) -> Request:
    return parse_request(
        json.dumps(payload).encode(),
        max_images=MAX_IMAGES,
        default_size=(1024, 1024),
        draw_seed=lambda: 7,
        refiner=refiner,
    )


def test_new_parameters_default_to_text_to_image_as_before() -> None:
    request = parse(body())
    assert (request.mode, request.scheduler, request.strength, request.refine) == ("text-to-image", None, None, "none")
    assert (request.high_noise_frac, request.refine_steps) == (0.8, None)
    assert request.cost == 1024 * 1024 * (30 + 2)  # as before issue 15


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("euler", "euler"),
        ("Euler_A", "euler_a"),
        ("dpmpp-2m-karras", "dpmpp_2m_karras"),
        ("DPMPP_SDE_KARRAS", "dpmpp_sde_karras"),
        ("ddim", "ddim"),
        ("heun", "heun"),
        ("UniPC", "unipc"),
        ("kdpm2", "kdpm2"),
        ("dpmpp_2m", "dpmpp_2m"),
    ],
)
def test_scheduler_names_are_case_insensitive_and_take_hyphens(given: str, name: str) -> None:
    assert parse(body(scheduler=given)).scheduler == name


@pytest.mark.parametrize("bad", ["plms", "", "euler a", 3, ["euler"]])
def test_an_unknown_scheduler_is_refused_listing_the_names(bad: Any) -> None:
    error = refused(body(scheduler=bad))
    assert error.field == "parameters.scheduler"
    if isinstance(bad, str):
        assert "euler_a" in error.message and "dpmpp_2m_karras" in error.message


def test_strength_limits_and_defaults() -> None:
    assert parse(image_body()).strength == 0.8  # cog-sdxl's prompt_strength
    inpaint = {"instances": [{"prompt": "a", "image": PNG_64, "mask_image": PNG_64}]}
    assert parse(inpaint).strength == 1.0 and parse(inpaint).mode == "inpainting"
    for ok in (0.034, 0.5, 1, 1.0):
        assert parse(image_body(strength=ok)).strength == ok
    for bad in (0, -0.1, 1.001, 2, "0.5", True):
        assert refused(image_body(strength=bad)).field == "parameters.strength"


def test_strength_without_an_image_is_refused() -> None:
    error = refused(body(strength=0.5))
    assert error.field == "parameters.strength" and "image" in error.message


def test_steps_times_strength_must_leave_a_step() -> None:
    """diffusers runs int(steps x strength) steps of image-to-image; zero would return the input untouched."""
    assert parse(image_body(num_inference_steps=2, strength=0.5)).strength == 0.5
    error = refused(image_body(num_inference_steps=2, strength=0.49))
    assert error.field == "parameters.strength"
    assert "use strength 0.5 or more, or num_inference_steps 3 or more" in error.message
    error = refused(image_body(num_inference_steps=30, strength=0.001))
    assert "use strength 0.034 or more" in error.message and "num_inference_steps" not in error.message.split(":")[-1]


def test_refine_needs_a_refiner_on_the_server() -> None:
    for refine in ("expert_ensemble", "base_image", "Expert-Ensemble", "base-image"):
        error = refused(body(refine=refine))
        assert error.field == "parameters.refine" and "SDXL_REFINER" in error.message
        assert parse_with(body(refine=refine), refiner=True).refine == refine.lower().replace("-", "_")
    assert parse(body(refine="none")).refine == "none"
    assert refused(body(refine="both")).field == "parameters.refine"


def test_expert_ensemble_is_text_to_image_only() -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_with(image_body(refine="expert_ensemble"), refiner=True)
    assert raised.value.field == "parameters.refine" and "base_image" in raised.value.message
    assert parse_with(image_body(refine="base_image"), refiner=True).mode == "image-to-image"


def test_base_image_needs_a_refiner_step() -> None:
    """The refiner runs int(refine_steps x 0.3) steps; refine_steps defaults to num_inference_steps."""
    assert parse_with(body(refine="base_image", refine_steps=4), refiner=True).refine_steps == 4
    for payload in (body(refine="base_image", refine_steps=3), body(refine="base_image", num_inference_steps=3)):
        with pytest.raises(InvalidRequest) as raised:
            parse_with(payload, refiner=True)
        assert raised.value.field == "parameters.refine_steps" and "4 or more" in raised.value.message
    for bad in (0, 151, 2.5, "4"):
        assert refused(body(refine_steps=bad)).field == "parameters.refine_steps"


def test_high_noise_frac_limits() -> None:
    for ok in (0.01, 0.5, 0.99):
        assert parse(body(high_noise_frac=ok)).high_noise_frac == ok
    for bad in (0, 1, -0.5, 1.5, "0.8"):
        assert refused(body(high_noise_frac=bad)).field == "parameters.high_noise_frac"


@pytest.mark.parametrize(
    ("scheduler", "steps", "fraction", "who"),
    [
        (None, 1, 0.8, "the base model"),
        (None, 4, 0.1, "the base model"),
        (None, 10, 0.9999, "the refiner"),
        (None, 2, 0.35, "the base model"),
        ("dpmpp_2m", 4, 0.8, "the refiner"),
        ("heun", 3, 0.3, "the base model"),
    ],
)
def test_high_noise_frac_that_leaves_a_model_no_step_is_refused(
    scheduler: str | None, steps: int, fraction: float, who: str
) -> None:
    payload = body(refine="expert_ensemble", num_inference_steps=steps, high_noise_frac=fraction, scheduler=scheduler)
    with pytest.raises(InvalidRequest) as raised:
        parse_with(payload, refiner=True)
    assert raised.value.field == "parameters.high_noise_frac" and who in raised.value.message


def test_the_split_depends_on_the_sampler_as_in_diffusers() -> None:
    """Euler spaces 4 steps 'leading' (751..1), DPM++ 2M from 999 on: 0.8 leaves its refiner nothing."""
    assert parse_with(body(refine="expert_ensemble", num_inference_steps=4), refiner=True).refine == "expert_ensemble"
    assert (
        parse_with(
            body(refine="expert_ensemble", num_inference_steps=2, high_noise_frac=0.35, scheduler="dpmpp_2m"),
            refiner=True,
        ).scheduler
        == "dpmpp_2m"
    )


def test_cost_counts_the_steps_that_run() -> None:
    pixels = 64 * 64
    assert parse(image_body(num_inference_steps=10, strength=0.5)).cost == pixels * (5 + 3)
    assert parse(body(num_inference_steps=10, width=64, height=64, scheduler="heun")).cost == pixels * (20 + 2)
    ensemble = parse_with(body(num_inference_steps=10, width=64, height=64, refine="expert_ensemble"), refiner=True)
    assert ensemble.cost == pixels * (10 + 2)
    refined = parse_with(body(num_inference_steps=10, width=64, height=64, refine="base_image"), refiner=True)
    assert refined.cost == pixels * (10 + 3 + 2)
    both = parse_with(image_body(num_inference_steps=10, refine="base_image", refine_steps=20), refiner=True)
    assert both.cost == pixels * (8 + 6 + 3)
