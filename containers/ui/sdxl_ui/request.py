"""The predict body from what the page's controls say, in the model server's contract."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sdxl_ui import limits, loras
from sdxl_ui.images import encode, from_editor

MODES = ("text-to-image", "image-to-image", "inpainting")


@dataclass
class Choices:
    """The page's controls, as Gradio hands them over (numbers as floats, images as PIL)."""

    prompt: str
    negative: str = ""
    style: str = "none"
    seed: float | None = None
    randomize: bool = True
    width: float = 1024
    height: float = 1024
    steps: float = 30
    guidance: float = 5.0
    num_images: float = 1
    scheduler: str = limits.DEFAULT_SCHEDULER
    refine: str = "none"
    high_noise_frac: float = limits.DEFAULT_HIGH_NOISE_FRAC
    mode: str = "text-to-image"
    image: Any = None  # image to image: the upload
    strength: float = limits.DEFAULT_STRENGTH["image-to-image"]
    editor: Any = None  # inpainting: the editor's {"background", "layers", "composite"}
    inpaint_strength: float = limits.DEFAULT_STRENGTH["inpainting"]
    lora: str | None = loras.NONE  # a preloaded adapter's name, or none
    lora_scale: float = loras.DEFAULT_SCALE


def build_body(
    choices: Choices, *, max_bytes: int = limits.DEFAULT_MAX_REQUEST_BYTES
) -> tuple[dict[str, Any], list[str]]:
    """(the body, notes for the page about the images it sends); ImageProblem (a ValueError) when an
    image is missing or cannot be sent."""
    from sdxl_ui.images import ImageProblem

    instance: dict[str, Any] = {"prompt": choices.prompt.strip()}
    if choices.negative and choices.negative.strip():
        instance["negative_prompt"] = choices.negative.strip()
    if choices.style and choices.style != "none":
        instance["style"] = choices.style
    if not choices.randomize and choices.seed is not None:
        instance["seed"] = int(choices.seed)
    parameters: dict[str, Any] = {
        "num_inference_steps": int(choices.steps),
        "guidance_scale": float(choices.guidance),
        "num_images": int(choices.num_images),
        "scheduler": choices.scheduler or limits.DEFAULT_SCHEDULER,
        "output_format": "jpeg",
        "quality": 92,
    }
    if choices.refine and choices.refine != "none":
        parameters["refine"] = choices.refine
        if choices.refine == "expert_ensemble":
            parameters["high_noise_frac"] = float(choices.high_noise_frac)
    if choices.lora and choices.lora != loras.NONE:
        # one preloaded adapter, by name: the server checks the name; the slider's steps of 0.05 arrive as
        # floats such as 0.7000000000000001
        parameters["lora"] = [{"name": choices.lora, "scale": round(float(choices.lora_scale), 4)}]
    body = {"instances": [instance], "parameters": parameters}
    if choices.mode == "text-to-image":
        parameters |= {"width": int(choices.width), "height": int(choices.height)}
        return body, []
    if choices.mode == "image-to-image":
        if choices.image is None:
            raise ImageProblem("upload an image first")
        image, mask = choices.image, None
        parameters["strength"] = float(choices.strength)
    else:
        image, mask = from_editor(choices.editor)
        parameters["strength"] = float(choices.inpaint_strength)
    # The output takes the image's size, made one the server takes as it is (the sliders are text to image's)
    encoded = encode(image, mask, max_bytes=max_bytes, reserve=len(json.dumps(body).encode()) + 64)
    parameters["width"], parameters["height"] = encoded.size
    instance["image"] = encoded.image
    if encoded.mask is not None:
        instance["mask_image"] = encoded.mask
    return body, encoded.notes
