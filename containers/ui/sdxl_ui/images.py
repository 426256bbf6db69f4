"""Images from the page into a request, as `sdxlctl predict` sends them: sides a multiple of 8 within the
server's 64..2048, and image and mask together under the endpoint's request byte limit (re-encoded, then
made smaller, and the page says so)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdxl_ui import limits

if TYPE_CHECKING:
    from PIL.Image import Image

# JSON around the images that the caller's `reserve` cannot see exactly (the keys, a proxy's own framing)
SLACK_BYTES = 1024
JPEG_QUALITIES = (92, 85, 75, 60)
SHRINK = 0.8  # each side, per try, once no JPEG quality fits


class ImageProblem(ValueError):
    """What to tell the person about the image they gave, in one sentence."""


@dataclass
class Encoded:
    """The request's `image` (and `mask_image`) in base64, their size, and what was changed to send them."""

    image: str
    mask: str | None
    size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


def fitting_size(width: int, height: int) -> tuple[int, int]:
    """The nearest size the server takes as it is: each side a multiple of 8 from 64 to 2048, same aspect."""
    scale = min(1.0, limits.MAX_SIDE / max(width, height))
    scale = max(scale, limits.MIN_SIDE / min(width, height))  # a tiny image grows to the smallest side

    def side(value: float) -> int:
        rounded = int(value) // limits.SIDE_STEP * limits.SIDE_STEP
        return min(limits.MAX_SIDE, max(limits.MIN_SIDE, rounded))

    return side(width * scale), side(height * scale)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(image: Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=image.mode in ("L", "1"))
    return buffer.getvalue()


def _jpeg(image: Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def rgb(image: Image) -> Image:
    """RGB, transparent parts on white (as the editor shows them), not on black; 16 bits scaled to 8."""
    from PIL import Image as PILImage

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # a 16-bit PNG: convert("RGB") would clip it white
        image = image.convert("I").point(lambda value: value / 257).convert("L")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return PILImage.alpha_composite(PILImage.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def encode(
    image: Image, mask: Image | None = None, *, max_bytes: int = limits.DEFAULT_MAX_REQUEST_BYTES, reserve: int = 0
) -> Encoded:
    """The image (and mask) for a request body of at most `max_bytes`, of which the rest of the body takes
    `reserve`: PNG when it fits, else JPEG, else smaller; an ImageProblem when even 64 a side would not fit."""
    from PIL import Image as PILImage

    image = rgb(image)
    limit = f"the endpoint's {max_bytes / 1e6:g} MB request limit"
    size = fitting_size(*image.size)
    why = "sides a multiple of 8 from 64 to 2048"
    while True:
        shown = image.resize(size, PILImage.Resampling.LANCZOS) if size != image.size else image
        mask_b64 = _b64(_png(mask.convert("L").resize(size, PILImage.Resampling.NEAREST))) if mask else None
        budget = (max_bytes - reserve - SLACK_BYTES - len(mask_b64 or "")) * 3 // 4  # base64: 4 chars per 3 bytes
        notes = (
            [] if size == image.size else [f"resized from {image.width}x{image.height} to {size[0]}x{size[1]} ({why})"]
        )
        data = _png(shown)
        if len(data) <= budget:
            return Encoded(_b64(data), mask_b64, size, notes)
        for quality in JPEG_QUALITIES:
            data = _jpeg(shown, quality)
            if len(data) <= budget:
                return Encoded(_b64(data), mask_b64, size, [*notes, f"sent as JPEG (quality {quality}) to fit {limit}"])
        smaller = fitting_size(int(size[0] * SHRINK), int(size[1] * SHRINK))
        if smaller == size:
            raise ImageProblem(f"the image does not fit {limit}, even at {size[0]}x{size[1]}")
        size, why = smaller, f"to fit {limit}"


def from_editor(value: dict[str, Any] | None) -> tuple[Image, Image]:
    """The inpainting editor's value (background + painted layers, RGBA) as (image, mask): the mask is
    white wherever any layer has paint (its alpha), black elsewhere, at the image's size."""
    from PIL import Image as PILImage
    from PIL import ImageChops

    background = (value or {}).get("background")
    if background is None:
        raise ImageProblem("upload an image to inpaint first")
    mask = PILImage.new("L", background.size, 0)
    for layer in (value or {}).get("layers") or []:
        if layer is None:
            continue
        alpha = layer.getchannel("A") if "A" in layer.getbands() else PILImage.new("L", layer.size, 0)
        if alpha.size != background.size:
            alpha = alpha.resize(background.size, PILImage.Resampling.NEAREST)
        mask = ImageChops.lighter(mask, alpha.point(lambda a: 255 if a else 0))
    if mask.getbbox() is None:
        raise ImageProblem("paint over the part of the image to repaint first (the brush, white)")
    return rgb(background), mask
