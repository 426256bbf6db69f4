"""What predict sends beyond the prompt: the generation mode's names, and input images fitted to what the
deployment takes (size, then request bytes), saying each change. The user's files are only read.

The names are the model server's (sdxl_server.schema.SCHEDULER_NAMES; tests/cli/test_predict_modes.py keeps
them equal); the command line spells them with hyphens. Pillow is imported only when an image is read.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sdxlctl.errors import PredictError, SdxlctlError, UsageError

if TYPE_CHECKING:
    from PIL.Image import Image

SCHEDULERS = (
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
SECOND_ORDER = ("heun", "kdpm2", "dpmpp_sde_karras")  # two UNet calls a step: twice the time per step
REFINE = ("none", "expert_ensemble", "base_image")
MIN_SIDE, MAX_SIDE = 64, 2048  # the server refuses an input image outside these on either side
SENT_AS_IS = ("PNG", "JPEG", "WEBP")  # the formats the server decodes; any other is re-encoded
QUALITIES = (95, 90, 85, 80, 75, 70, 60, 50)  # re-encoding tries these, best first; below 50 it refuses
# JSON around the images that `overhead` cannot see exactly (key spellings, a proxy's own framing).
SLACK_BYTES = 1024
ORIENTATION = 0x0112  # the EXIF tag
SMALL_MASK_BYTES = 64 * 1024  # a mask under this goes as it is; a larger one may shrink as grayscale PNG


def spelled(name: str) -> str:
    """A server name as the command line spells it: dpmpp_2m_karras -> dpmpp-2m-karras."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class Limit:
    """What one request to the deployment may carry, and whose limit that is."""

    bytes: int
    where: Literal["local", "shared", "dedicated", "cloudrun"]

    @property
    def name(self) -> str:
        """Whose limit, and how large: "the shared endpoint's 1.5 MB request limit"."""
        owner = {"local": "the local server's", "cloudrun": "Cloud Run's"}.get(
            self.where, f"the {self.where} endpoint's"
        )
        return f"{owner} {megabytes(self.bytes)} request limit"

    @property
    def hint(self) -> str:
        if self.where == "shared":
            return 'use a smaller image, or a dedicated endpoint: [deploy] endpoint = "dedicated" takes 10 MB'
        if self.where == "local":
            return "use a smaller image (the local server takes what a shared Vertex AI endpoint takes)"
        return "use a smaller image"


SHARED_LIMIT_BYTES = 1_500_000  # a request to a shared Vertex AI endpoint
DEDICATED_LIMIT_BYTES = 10_000_000  # to a dedicated one
CLOUD_RUN_LIMIT_BYTES = 32 * 1024 * 1024  # an HTTP/1 request to a Cloud Run service (32 MiB)


def limit_of(target: str, endpoint: Literal["shared", "dedicated"]) -> Limit:
    """What one request may carry on `target`; the local server keeps a shared endpoint's limit."""
    if target == "cloudrun":
        return Limit(CLOUD_RUN_LIMIT_BYTES, "cloudrun")
    where: Literal["local", "shared", "dedicated"] = "local" if target == "local" else endpoint
    return Limit(DEDICATED_LIMIT_BYTES if where == "dedicated" else SHARED_LIMIT_BYTES, where)


@dataclass(frozen=True)
class ModeInputs:
    """predict's image-to-image, inpainting, sampler and refiner options; None means the server's default."""

    image: Path | None = None
    mask: Path | None = None
    strength: float | None = None
    scheduler: str | None = None  # a name of SCHEDULERS
    refine: str | None = None  # a name of REFINE
    high_noise_frac: float | None = None
    refine_steps: int | None = None

    def check(self) -> None:
        """Options that mean nothing without another are refused, never taken in silence."""
        if self.image is None:
            for option, value in (("--mask", self.mask), ("--strength", self.strength)):
                if value is not None:
                    raise UsageError(
                        f"{option} needs --image: it applies to image-to-image and inpainting",
                        hint=f"add --image in.png, or drop {option}",
                    )
        elif self.refine == "expert_ensemble":
            raise UsageError(
                "--refine expert-ensemble works on text-to-image only (the base hands over its latents)",
                hint="with --image, use --refine base-image",
            )
        if self.high_noise_frac is not None and self.refine != "expert_ensemble":
            raise UsageError(
                "--high-noise-frac applies to --refine expert-ensemble only",
                hint="add --refine expert-ensemble, or drop --high-noise-frac",
            )
        if self.refine_steps is not None and self.refine != "base_image":
            raise UsageError(
                "--refine-steps applies to --refine base-image only",
                hint="add --refine base-image, or drop --refine-steps",
            )

    def parameters(self) -> dict[str, Any]:
        """The request's parameters for these options (the images go into the instance: `attach`)."""
        given = {
            "scheduler": self.scheduler,
            "strength": self.strength,
            "refine": self.refine,
            "high_noise_frac": self.high_noise_frac,
            "refine_steps": self.refine_steps,
        }
        return {key: value for key, value in given.items() if value is not None}


@dataclass
class Sent:
    """The request as sent, and what was changed in the user's images to send it."""

    body: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def attach(body: dict[str, Any], inputs: ModeInputs, limit: Limit) -> Sent:
    """`body` with the input image (and mask) in its instance, fitted to `limit`; notes say what changed."""
    inputs.check()
    sent = Sent(body)
    if inputs.image is None:
        return sent
    parameters = body["parameters"]
    image = _read(inputs.image, "--image")
    if image.turned:
        sent.notes.append(f"{inputs.image.name} turned upright, as its EXIF orientation says")
    size = _size(image, inputs.image, parameters.get("width"), parameters.get("height"), sent.notes)
    parameters["width"], parameters["height"] = size  # the server then resizes nothing
    mask = _read(inputs.mask, "--mask") if inputs.mask is not None else None
    budget = limit.bytes - overhead(body) - SLACK_BYTES
    instance = body["instances"][0]
    if mask is not None and inputs.mask is not None:
        if mask.pixels.size != size:
            sent.notes.append(f"{inputs.mask.name} {_wxh(mask.pixels.size)} resized to the image's {_wxh(size)}")
        instance["mask_image"] = _encoded_mask(mask, size)
        budget -= len(instance["mask_image"])
    instance["image"] = _encoded_image(image, size, inputs.image, budget, limit, sent.notes)
    return sent


def explained(error: SdxlctlError) -> SdxlctlError:
    """The server's refusal of a refiner it does not have, with sdxlctl's way to give it one (on either target)."""
    if "SDXL_REFINER" in error.message:
        return PredictError(
            error.message, hint='set [model] refiner in sdxlctl.toml (e.g. "tiny" on the tiny model), then deploy'
        )
    return error


def overhead(body: dict[str, Any]) -> int:
    """Bytes of the request besides the images, as httpx writes it (json.dumps with its defaults)."""
    return len(json.dumps(body).encode())


def megabytes(count: int) -> str:
    """1500000 -> 1.5 MB (decimal, as Vertex AI states its limits)."""
    return f"{count / 1e6:.1f} MB" if count < 10e6 else f"{count / 1e6:.0f} MB"


# ---------------------------------------------------------------- reading and fitting


@dataclass
class _Read:
    pixels: Image
    data: bytes  # the file as it is
    format: str  # PIL's name of it: PNG, JPEG, WEBP, GIF, ...
    changed: bool  # turned upright, a frame taken, 16 bits made 8: the file's bytes no longer show these pixels
    turned: bool  # by its EXIF orientation


def _read(path: Path, option: str) -> _Read:
    """The image in `path`, upright (EXIF orientation), first frame; a UsageError naming the option if not one."""
    import warnings

    from PIL import Image as PIL
    from PIL import ImageOps, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file", hint="check the path") from None
    except IsADirectoryError:
        raise UsageError(f"{option} {path}: is a folder", hint="name an image file") from None
    except OSError as exc:
        raise UsageError(
            f"{option} {path}: cannot read it ({exc.strerror or exc})", hint="check its permissions"
        ) from None
    opened = None
    try:
        with warnings.catch_warnings():
            # The user's own file, read on their machine: a large photo is not an attack here. The server
            # refuses anything over 2048x2048 anyway, and this side sends at most that.
            warnings.simplefilter("ignore", PIL.DecompressionBombWarning)
            opened = PIL.open(io.BytesIO(data))
            frames = getattr(opened, "n_frames", 1)
            opened.load()
            # Cameras store pixels as the sensor read them and say how to turn them; diffusers' load_image
            # turns them, so the server's input is what the user sees. Turned here, the bytes are re-encoded.
            turned = opened.getexif().get(ORIENTATION, 1) != 1
            ImageOps.exif_transpose(opened, in_place=True)
    except (UnidentifiedImageError, PIL.DecompressionBombError) as exc:
        what = "is too large to open" if isinstance(exc, PIL.DecompressionBombError) else "is not an image"
        raise UsageError(f"{option} {path} {what}", hint="give a PNG, JPEG or WebP file") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data, a broken header
        raise UsageError(
            f"{option} {path} is not a complete {(opened and opened.format) or 'image'} ({exc})",
            hint="save the image again",
        ) from None
    pixels: Image = opened
    deep = opened.mode.startswith("I;16") or (opened.mode == "I" and opened.format == "PNG")
    if deep:  # 16-bit grayscale: Pillow's convert("RGB") (the server's, diffusers') clips it at 255, all white
        pixels = opened.convert("I").point(lambda value: value / 257).convert("L")
    return _Read(pixels, data, str(opened.format or ""), changed=turned or frames > 1 or deep, turned=turned)


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _size(image: _Read, path: Path, width: int | None, height: int | None, notes: list[str]) -> tuple[int, int]:
    """The size to send: --width/--height (one given: the other keeps the aspect); else the image's own,
    within 2048 a side and in multiples of 8 (the server's terms), resized keeping the aspect."""
    w, h = image.pixels.size
    if width is not None and height is not None:
        size = (width, height)
    elif width is not None:
        size = (width, _eight(width * h / w))
    elif height is not None:
        size = (_eight(height * w / h), height)
    else:  # shrunk to at most 2048 a side, or enlarged to at least 64 (the server refuses either)
        scale = max(min(1.0, MAX_SIDE / w, MAX_SIDE / h), MIN_SIDE / min(w, h))
        size = (_eight(w * scale), _eight(h * scale))
    if not all(MIN_SIDE <= side <= MAX_SIDE for side in size):
        raise UsageError(
            f"--image {path} is {_wxh((w, h))}: at that aspect no size fits {MIN_SIDE}..{MAX_SIDE} on both sides",
            hint="crop it nearer to square, or give --width and --height",
        )
    if size != (w, h):
        limit = f"at least {MIN_SIDE}" if min(w, h) < MIN_SIDE else f"at most {MAX_SIDE}"
        why = "--width/--height" if width or height else f"multiples of 8, {limit} a side"
        notes.append(f"{path.name} {_wxh((w, h))} resized to {_wxh(size)} ({why})")
    return size


def _eight(side: float) -> int:
    """The nearest multiple of 8 (at least 8); a side out of 64..2048 is refused by the caller, not clamped,
    which would change the aspect."""
    return max(8, round(side / 8) * 8)


def _encoded_mask(mask: _Read, size: tuple[int, int]) -> str:
    """The mask as it is when the server can take it and it is small; else grayscale PNG at the image's size
    (masks compress to little), whichever is smaller: its bytes come out of the image's share."""
    as_is = mask.format in SENT_AS_IS and not mask.changed and mask.pixels.size == size
    if as_is and len(mask.data) <= SMALL_MASK_BYTES:
        return base64.b64encode(mask.data).decode()
    from PIL import Image as PIL

    gray = mask.pixels.convert("L")
    if gray.size != size:
        gray = gray.resize(size, PIL.Resampling.LANCZOS)
    png = _save(gray, "PNG", optimize=True)
    return base64.b64encode(mask.data if as_is and len(mask.data) < len(png) else png).decode()


def _encoded_image(image: _Read, size: tuple[int, int], path: Path, budget: int, limit: Limit, notes: list[str]) -> str:
    """The image as base64 in at most `budget` bytes: the file itself when the server can take it as it is,
    else lossless PNG, else JPEG or WebP at the best quality that fits (saying so)."""
    from PIL import Image as PIL

    as_is = image.format in SENT_AS_IS and not image.changed and image.pixels.size == size
    if as_is and _b64_len(len(image.data)) <= budget:
        return base64.b64encode(image.data).decode()
    pixels = image.pixels if image.pixels.mode in ("RGB", "RGBA", "L", "LA") else image.pixels.convert("RGB")
    if pixels.size != size:
        pixels = pixels.resize(size, PIL.Resampling.LANCZOS)
    if not as_is:  # changed anyway: lossless first, when the request has room for it
        png = _save(pixels, "PNG")
        if _b64_len(len(png)) <= budget:
            if image.format not in ("PNG", ""):
                notes.append(f"{path.name} ({image.format}) sent as PNG")
            return base64.b64encode(png).decode()
    rgb = pixels if pixels.mode == "RGB" else pixels.convert("RGB")  # what the server makes of it too
    smallest = 0
    for quality in QUALITIES:
        for fmt in ("JPEG", "WEBP"):
            data = _save(rgb, fmt, quality=quality)
            smallest = len(data)
            if _b64_len(len(data)) <= budget:
                notes.append(
                    f"{path.name} {megabytes(len(image.data))} re-encoded as {fmt} q{quality} "
                    f"({megabytes(len(data))}) to fit {limit.name}"
                )
                return base64.b64encode(data).decode()
    raise UsageError(
        f"--image {path} does not fit {limit.name}: {_wxh(size)} is {megabytes(smallest)} even as WebP "
        f"q{QUALITIES[-1]} (base64 makes it 4/3 of that)",
        hint=limit.hint,
    )


def _save(pixels: Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    pixels.save(buffer, fmt, **options)
    return buffer.getvalue()


def _b64_len(raw: int) -> int:
    return 4 * math.ceil(raw / 3)
