"""The model server's rules for one instance and for the parameters, copied so a prompts file is checked here,
line by line, before anything is uploaded (sdxlctl never imports sdxl_server: a cloud-only install lacks it).

Copied from containers/model/sdxl_server/schema.py (Instance, Parameters) with the same pydantic types, so a
value is accepted or refused for the same reason and the same field is named; tests/batch/test_rules_agree.py
runs a corpus through both and keeps them equal, and keeps STYLES equal to the server's styles.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

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

from sdxlctl.inputs import REFINE, SCHEDULERS

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1
MIN_STEPS, MAX_STEPS = 1, 150
MIN_GUIDANCE, MAX_GUIDANCE = 0, 30
MIN_QUALITY, MAX_QUALITY = 1, 100
MIN_SIDE, MAX_SIDE, SIDE_STEP = 64, 2048, 8
OUTPUT_FORMATS = ("png", "jpeg", "webp")
BASE_IMAGE_STRENGTH = 0.3  # the refiner's strength in refine base_image (sdxl_server.steps)
# The server refuses a body nested deeper than this; a batch line sits two levels down in it
# ({"instances": [line]}), so a line may nest MAX_DEPTH - 2 levels.
MAX_DEPTH = 8
LINE_DEPTH = MAX_DEPTH - 2
# The ids of sdxl_server/styles.json, in its order ("none" is also accepted: no style).
STYLES = (
    "3d-model",
    "analog-film",
    "anime",
    "cinematic",
    "comic-book",
    "modeling-compound",
    "digital-art",
    "enhance",
    "fantasy-art",
    "isometric",
    "line-art",
    "low-poly",
    "neon-punk",
    "origami",
    "photographic",
    "pixel-art",
    "tile-texture",
)
# What a line of a prompts file may carry: the server's instance fields without the input images and the
# adapters (a batch shares one set of parameters, given as flags).
LINE_FIELDS = ("prompt", "text", "negative_prompt", "prompt_2", "negative_prompt_2", "style", "seed")
PARAMETER_FIELDS = (
    "num_inference_steps",
    "guidance_scale",
    "width",
    "height",
    "num_images",
    "output_format",
    "quality",
    "negative_prompt",
    "scheduler",
    "strength",
    "refine",
    "high_noise_frac",
    "refine_steps",
    "lora",
    "lora_id",
)


@dataclass(frozen=True)
class Problem:
    """What is wrong with an instance or the parameters: the field (as the server names it inside the object;
    "" for the object as a whole) and what is allowed."""

    field: str
    message: str


class _FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def _whole(value: Any) -> Any:
    """30.0 -> 30, as the server reads protobuf doubles."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _name(value: Any) -> Any:
    return value.strip().lower().replace("-", "_") if isinstance(value, str) else value


Whole = Annotated[StrictInt, BeforeValidator(_whole)]
Prompt = Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)]
Side = Annotated[Whole, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIDE_STEP)]
Fraction = StrictFloat | StrictInt
Name = Annotated[StrictStr, BeforeValidator(_name)]


class LineInstance(BaseModel):
    """sdxl_server.schema.Instance, less image, mask_image, lora_id and parameters (refused before this)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt | None = None
    text: Prompt | None = None
    negative_prompt: Prompt | None = None
    prompt_2: Prompt | None = None
    negative_prompt_2: Prompt | None = None
    style: StrictStr | None = None
    seed: Annotated[Whole, Field(ge=0, le=MAX_SEED)] | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> LineInstance:
        if self.prompt is not None and self.text is not None:
            raise _FieldError("text", "give either prompt or text (Model Garden's name for it), not both")
        if not (self.prompt if self.prompt is not None else self.text or "").strip():
            raise _FieldError("prompt", "a non-empty prompt (or text) is required")
        if self.style is not None and self.style.lower() not in {"none", *STYLES}:
            raise _FieldError("style", f"unknown style {self.style!r}; allowed: none, {', '.join(STYLES)}")
        return self


class SharedParameters(BaseModel):
    """sdxl_server.schema.Parameters."""

    model_config = ConfigDict(extra="forbid")

    num_inference_steps: Annotated[Whole, Field(ge=MIN_STEPS, le=MAX_STEPS)] = 30
    guidance_scale: Annotated[StrictFloat | StrictInt, Field(ge=MIN_GUIDANCE, le=MAX_GUIDANCE)] = 5.0
    width: Side | None = None
    height: Side | None = None
    num_images: Annotated[Whole, Field(ge=1)] = 1
    output_format: Literal["png", "jpeg", "webp"] = "jpeg"
    quality: Annotated[Whole, Field(ge=MIN_QUALITY, le=MAX_QUALITY)] = 90
    negative_prompt: Prompt | None = None
    scheduler: Name | None = None
    strength: Annotated[Fraction, Field(gt=0, le=1)] | None = None
    refine: Name = "none"
    high_noise_frac: Annotated[Fraction, Field(gt=0, lt=1)] = 0.8
    refine_steps: Annotated[Whole, Field(ge=MIN_STEPS, le=MAX_STEPS)] | None = None
    lora: Any = None  # the server checks adapters (sources, its allow-list)
    lora_id: Any = None

    @model_validator(mode="after")
    def _supported(self) -> SharedParameters:
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise _FieldError("scheduler", f"unknown scheduler {self.scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
        if self.refine not in REFINE:
            raise _FieldError("refine", f"unknown refine {self.refine!r}; allowed: {', '.join(REFINE)}")
        return self


def check_instance(data: dict[str, Any]) -> tuple[dict[str, Any], Problem | None]:
    """A line's instance as the server reads it (given fields only), or the first problem the server names."""
    try:
        parsed = LineInstance.model_validate(data)
    except ValidationError as exc:
        return {}, _problem(exc)
    return parsed.model_dump(exclude_unset=True, exclude_none=True), None


def check_parameters(data: dict[str, Any]) -> tuple[dict[str, Any], Problem | None]:
    """The shared parameters as the server reads them (given ones only, names normalised), or the first problem.

    Batch lines are text-to-image, so strength is refused as the server refuses it there. Not checked here:
    whether the server has a refiner, expert_ensemble's split of the steps (both need the server), and
    num_images x instances against the server's max_images (the batch size is chosen to fit it)."""
    try:
        parsed = SharedParameters.model_validate(data)
    except ValidationError as exc:
        return {}, _problem(exc)
    if parsed.strength is not None:
        return {}, Problem("strength", "strength applies to an input image, and a batch is text-to-image: leave it out")
    given = parsed.refine_steps or parsed.num_inference_steps
    if parsed.refine == "base_image" and int(given * BASE_IMAGE_STRENGTH) < 1:
        return {}, Problem(
            "refine_steps",
            f"base_image refines with strength {BASE_IMAGE_STRENGTH}, so int({given} x {BASE_IMAGE_STRENGTH}) = 0 "
            "refiner steps: give refine_steps 4 or more (it defaults to num_inference_steps)",
        )
    return parsed.model_dump(exclude_unset=True), None


def depth_over(data: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` deep (iterative: no depth overflows the stack)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _problem(exc: ValidationError) -> Problem:
    """The first error, as the server's _invalid words it: the field and what is allowed."""
    error = exc.errors(include_url=False)[0]
    context = error.get("ctx") or {}
    if isinstance(context.get("error"), _FieldError):
        found = context["error"]
        return Problem(_path([*error["loc"], found.field]), found.message)
    last = error["loc"][-1] if error["loc"] else ""
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "string_too_long":
        message = f"too long: at most {MAX_PROMPT_CHARS} characters"
    elif error["loc"][:1] == ("seed",):
        message = seed_problem(error.get("input"))
    elif last in ("width", "height") and error["type"] in {"multiple_of", "greater_than_equal", "less_than_equal"}:
        message = f"must be a multiple of {SIDE_STEP} between {MIN_SIDE} and {MAX_SIDE}"
    return Problem(_path(error["loc"]), message)


def seed_problem(value: Any) -> str:
    """A bad seed, in the same words whether it came from JSON (-1, 1.5, "7") or a CSV cell ('x', -1)."""
    import json

    shown = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return f"{shown} is not an integer from 0 to {MAX_SEED}"


def _path(location: Any) -> str:
    """('seed',) -> 'seed'; pydantic's union branch names are dropped, as the server drops them."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in {"int", "float", "str", "none", "constrained-int", "constrained-float"} or "[" in str(part):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path
