"""The predict request: parsed and checked completely before any work is done."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from sdxl_server import images, steps
from sdxl_server.body import depth_over, load_json
from sdxl_server.errors import InvalidRequest
from sdxl_server.images import MAX_SIDE, MIN_SIDE, SIDE_STEP
from sdxl_server.lora.request import LoraRef, check_count, lora_refs
from sdxl_server.schedulers import unet_calls
from sdxl_server.steps import BASE_IMAGE_STRENGTH, MAX_STEPS
from sdxl_server.styles import styles

if TYPE_CHECKING:
    from PIL.Image import Image

MAX_PROMPT_CHARS = 2000  # CLIP reads 77 tokens; anything this long is a mistake, not a prompt
# Seeds are 32-bit (what the CLI, gcloud's JSON and every SD front end pass around) and image i of an
# instance uses (seed + i) mod 2**32, so every seed the server returns is one it accepts back.
SEED_SPACE = 2**32
MAX_SEED = SEED_SPACE - 1
MIN_STEPS = 1  # MAX_STEPS is steps.py's; the sides are images.py's (an input image's and the output's)
MIN_GUIDANCE, MAX_GUIDANCE = 0, 30
MIN_QUALITY, MAX_QUALITY = 1, 100
# A valid body is three levels deep ({"instances": [{"prompt": ...}]}); deeper JSON is never a request,
# and walking it would cost time for nothing.
MAX_DEPTH = 8
# Named in refusals: the server's variable, and the key sdxlctl sets it from (what its users can change).
MAX_IMAGES_SOURCE = "SDXL_MAX_IMAGES; sdxlctl sets it from [model] max_images"
# sdxl_server.schedulers.SCHEDULERS has these keys (its test keeps them equal); None is the model's own (Euler).
SCHEDULER_NAMES = (
    "euler",
    "euler_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_sde_karras",
    "ddim",
    "heun",
    "unipc",
    "kdpm2",
)
REFINE_MODES = ("none", "expert_ensemble", "base_image")


def seeds_from(first: int, count: int) -> tuple[int, ...]:
    """The seeds of `count` images starting at `first`, wrapping past MAX_SEED to 0."""
    return tuple((first + i) % SEED_SPACE for i in range(count))


def _whole(value: Any) -> Any:
    """30.0 -> 30: Vertex AI carries instances and parameters as protobuf Values, where every number is a double."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Whole = Annotated[StrictInt, BeforeValidator(_whole)]  # still refuses 1.5, "30" and true
Prompt = Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)]
Side = Annotated[Whole, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP)]
Fraction = StrictFloat | StrictInt


def _name(value: Any) -> Any:
    """'DPMPP-2M-Karras' -> 'dpmpp_2m_karras': names as people type them."""
    return value.strip().lower().replace("-", "_") if isinstance(value, str) else value


Name = Annotated[StrictStr, BeforeValidator(_name)]


class Instance(BaseModel):
    """One prompt. `text` is Model Garden's name for `prompt`."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt | None = None
    text: Prompt | None = None
    negative_prompt: Prompt | None = None
    prompt_2: Prompt | None = None
    negative_prompt_2: Prompt | None = None
    style: StrictStr | None = None
    seed: Annotated[Whole, Field(ge=0, le=MAX_SEED)] | None = None
    image: StrictStr | None = None  # base64 PNG, JPEG or WebP: decoded in parse_request, after every other check
    mask_image: StrictStr | None = None  # white = repaint
    lora_id: Any = None  # refused: adapters are per request (parameters.lora_id)
    # Overlaid on the body's parameters. Vertex AI batch prediction may not pass a job's modelParameters on
    # as the body's parameters, so sdxlctl writes them into every line too; all instances must agree.
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> Instance:
        if self.lora_id is not None:
            raise _FieldError("lora_id", "give it in parameters.lora_id (one set of adapters per request)")
        if self.prompt is not None and self.text is not None:
            raise _FieldError("text", "give either prompt or text (Model Garden's name for it), not both")
        if not (self.prompt if self.prompt is not None else self.text or "").strip():
            raise _FieldError("prompt", "a non-empty prompt (or text) is required")
        if self.style is not None and self.style.lower() not in {"none", *styles()}:
            raise _FieldError("style", f"unknown style {self.style!r}; allowed: none, {', '.join(styles())}")
        return self


class Parameters(BaseModel):
    """Generation settings shared by every instance of a request."""

    model_config = ConfigDict(extra="forbid")

    num_inference_steps: Annotated[Whole, Field(ge=MIN_STEPS, le=MAX_STEPS)] = 30
    guidance_scale: Annotated[StrictFloat | StrictInt, Field(ge=MIN_GUIDANCE, le=MAX_GUIDANCE)] = 5.0
    width: Side | None = None
    height: Side | None = None
    num_images: Annotated[Whole, Field(ge=1)] = 1
    output_format: Literal["png", "jpeg", "webp"] = "jpeg"
    quality: Annotated[Whole, Field(ge=MIN_QUALITY, le=MAX_QUALITY)] = 90
    # Model Garden's SDXL container takes the negative prompt here, for every instance without its own.
    negative_prompt: Prompt | None = None
    scheduler: Name | None = None
    strength: Annotated[Fraction, Field(gt=0, le=1)] | None = None
    refine: Name = "none"
    high_noise_frac: Annotated[Fraction, Field(gt=0, lt=1)] = 0.8
    refine_steps: Annotated[Whole, Field(ge=MIN_STEPS, le=MAX_STEPS)] | None = None
    # LoRA adapters: checked item by item in lora.request, so each error names its index (parameters.lora[1].scale).
    lora: Any = None
    lora_id: Any = None  # Model Garden's alias: one source at scale 1

    @model_validator(mode="after")
    def _supported(self) -> Parameters:
        if self.scheduler is not None and self.scheduler not in SCHEDULER_NAMES:
            raise _FieldError(
                "scheduler", f"unknown scheduler {self.scheduler!r}; allowed: {', '.join(SCHEDULER_NAMES)}"
            )
        if self.refine not in REFINE_MODES:
            raise _FieldError("refine", f"unknown refine {self.refine!r}; allowed: {', '.join(REFINE_MODES)}")
        return self


class PredictBody(BaseModel):
    """The body Vertex AI forwards: {"instances": [...], "parameters": {...}}."""

    model_config = ConfigDict(extra="forbid")

    instances: Annotated[list[Instance], Field(min_length=1)]
    parameters: Parameters | None = None


class _FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True)
class Job:
    """One instance, ready for the pipeline: style applied, seeds fixed, size resolved."""

    prompt: str
    negative_prompt: str | None
    prompt_2: str | None
    negative_prompt_2: str | None
    seeds: tuple[int, ...]
    model_garden: bool  # the instance said `text`: also answer with `output`
    image: Image | None = None  # decoded RGB, at the request's width x height: image-to-image or inpainting
    mask: Image | None = None  # decoded "L", same size as image; white = repaint: inpainting


@dataclass(frozen=True)
class Request:
    """A validated predict request."""

    jobs: tuple[Job, ...]
    steps: int
    guidance_scale: float
    width: int
    height: int
    output_format: str
    quality: int
    scheduler: str | None = None  # a key of sdxl_server.schedulers.SCHEDULERS; None: the model's own
    strength: float | None = None  # image-to-image and inpainting; None: the mode's default
    refine: str = "none"  # none | expert_ensemble | base_image
    high_noise_frac: float = 0.8  # expert_ensemble: where the base hands over to the refiner
    refine_steps: int | None = None  # base_image: the refiner's steps; None: num_inference_steps
    loras: tuple[LoraRef, ...] = ()  # LoRA adapters for every image of the request; () = the base model

    @property
    def mode(self) -> str:
        """text-to-image, image-to-image or inpainting (every instance of a request has the same)."""
        first = self.jobs[0]
        if first.image is None:
            return "text-to-image"
        return "image-to-image" if first.mask is None else "inpainting"

    @property
    def num_images(self) -> int:
        """Images across all instances."""
        return sum(len(job.seeds) for job in self.jobs)

    @property
    def cost(self) -> float:
        """How much work the request is, in proportion to its duration: UNet calls x pixels x images, plus
        about two steps' worth per image for the text encoders and the VAE decode (one more to encode an
        input image). Image-to-image runs int(steps x strength) steps, as diffusers does; a second-order
        sampler calls the UNet twice a step; base_image adds the refiner's int(refine_steps x 0.3) steps
        (expert_ensemble splits the same steps between the two models)."""
        denoised = self.steps if self.strength is None else int(self.steps * self.strength)
        if self.refine == "base_image":
            denoised += int((self.refine_steps or self.steps) * BASE_IMAGE_STRENGTH)
        calls = denoised * unet_calls(self.scheduler)
        overhead = 2 if self.mode == "text-to-image" else 3
        return float(self.num_images * self.width * self.height * (calls + overhead))

    @property
    def prompt_chars(self) -> int:
        """Length of all prompts together, for logs that must not contain them."""
        return sum(len(job.prompt) for job in self.jobs)


def parse_request(
    body: bytes, *, max_images: int, default_size: tuple[int, int], draw_seed: Any, refiner: bool = False
) -> Request:
    """Parse and validate a request body; raise InvalidRequest naming the field and what is allowed.

    Blocking and CPU-bound on large bodies: call it off the event loop. The cheap checks (JSON, shape,
    instance count, depth, image text length) come before pydantic looks at any instance, so a body of a
    million empty instances costs one json.loads, not a million validations; input images are decoded
    last, once every other field is known to be good. `refiner`: whether the server has one loaded.
    """
    data = load_json(body, max_depth=MAX_DEPTH)
    if not isinstance(data, dict):
        raise InvalidRequest('the body must be a JSON object {"instances": [...], "parameters": {...}}', field="body")
    instances = data.get("instances")
    if isinstance(instances, list) and len(instances) > max_images:
        raise InvalidRequest(
            f"instances: {len(instances)} instances; at most {max_images} images per request ({MAX_IMAGES_SOURCE})",
            field="instances",
        )
    check_count(data.get("parameters"))
    for instance in instances if isinstance(instances, list) else []:
        check_count(instance.get("parameters") if isinstance(instance, dict) else None)
    if depth_over(data, MAX_DEPTH):
        raise InvalidRequest(f"body: JSON nested deeper than {MAX_DEPTH} levels", field="body")
    images.check_lengths(instances)
    try:
        parsed = PredictBody.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    params = _shared(parsed)
    loras = lora_refs(params.lora, params.lora_id)
    total = len(parsed.instances) * params.num_images
    if total > max_images:
        field = "parameters.num_images" if params.num_images > 1 else "instances"
        raise InvalidRequest(
            f"{field}: {len(parsed.instances)} instance(s) x {params.num_images} image(s) = {total} images; "
            f"at most {max_images} per request ({MAX_IMAGES_SOURCE})",
            field=field,
        )
    mode = images.mode([(instance.image, instance.mask_image) for instance in parsed.instances])
    strength = steps.check(
        mode,
        steps=params.num_inference_steps,
        strength=params.strength,
        scheduler=params.scheduler,
        refine=params.refine,
        high_noise_frac=params.high_noise_frac,
        refine_steps=params.refine_steps,
        refiner=refiner,
    )
    if mode == "text-to-image":
        size = (params.width or default_size[0], params.height or default_size[1])
        inputs: Sequence[tuple[Image | None, Image | None]] = [(None, None)] * len(parsed.instances)
    else:
        size, inputs = images.inputs(
            [(instance.image or "", instance.mask_image) for instance in parsed.instances], params.width, params.height
        )
    return Request(
        jobs=tuple(
            _job(instance, params, draw_seed, image, mask)
            for instance, (image, mask) in zip(parsed.instances, inputs, strict=True)
        ),
        steps=params.num_inference_steps,
        guidance_scale=float(params.guidance_scale),
        width=size[0],
        height=size[1],
        output_format=params.output_format,
        quality=params.quality,
        scheduler=params.scheduler,
        strength=strength,
        refine=params.refine,
        high_noise_frac=float(params.high_noise_frac),
        refine_steps=params.refine_steps,
        loras=loras,
    )


def _shared(body: PredictBody) -> Parameters:
    """The body's parameters overlaid key by key with each instance's own: the same for every instance (one
    request is one pipeline call), else refused naming the first instance that differs."""
    given = body.parameters.model_dump(exclude_unset=True) if body.parameters is not None else {}
    each = [
        Parameters.model_validate({**given, **instance.parameters.model_dump(exclude_unset=True)})
        if instance.parameters is not None
        else body.parameters or Parameters()
        for instance in body.instances
    ]
    differs = next((i for i, effective in enumerate(each) if effective != each[0]), None)
    if differs is not None:
        field = f"instances[{differs}].parameters"
        message = (
            "every instance of a request shares its parameters; send instances with other parameters in another request"
        )
        raise InvalidRequest(f"{field}: {message}", field=field)
    return each[0]


def _job(instance: Instance, params: Parameters, draw_seed: Any, image: Image | None, mask: Image | None) -> Job:
    prompt = instance.prompt if instance.prompt is not None else instance.text or ""
    negative = instance.negative_prompt if instance.negative_prompt is not None else params.negative_prompt
    style = styles().get((instance.style or "none").lower())
    if style is not None:
        prompt, negative = style.apply(prompt, negative)
    seed = instance.seed if instance.seed is not None else draw_seed()
    return Job(
        prompt=prompt,
        negative_prompt=negative or None,
        prompt_2=instance.prompt_2,
        negative_prompt_2=instance.negative_prompt_2,
        seeds=seeds_from(seed, params.num_images),
        model_garden=instance.text is not None,
        image=image,
        mask=mask,
    )


def _invalid(exc: ValidationError) -> InvalidRequest:
    """The first problem, as 'field: what is wrong (what is allowed)'."""
    error = exc.errors(include_url=False)[0]
    context = error.get("ctx") or {}
    if isinstance(context.get("error"), _FieldError):
        field_error = context["error"]
        location = [*error["loc"], field_error.field]
        return InvalidRequest(f"{_path(location)}: {field_error.message}", field=_path(location))
    field = _path(error["loc"])
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "string_too_long":
        message = f"too long: at most {MAX_PROMPT_CHARS} characters"
    elif error["loc"][-1] in ("width", "height") and error["type"] in {
        "multiple_of",
        "greater_than_equal",
        "less_than_equal",
    }:
        message = f"must be a multiple of {SIDE_STEP} between {MIN_SIDE} and {MAX_SIDE}"
    return InvalidRequest(f"{field}: {message}", field=field)


def _path(location: Any) -> str:
    """('instances', 0, 'seed') -> 'instances[0].seed'; pydantic's union branch names are dropped."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in {"int", "float", "str", "none", "constrained-int", "constrained-float"} or "[" in str(part):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or "body"
