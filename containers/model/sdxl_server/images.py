"""Input images (image-to-image, inpainting) are hostile input: decoded here, with every limit checked.

The order matters: the base64 text's length before decoding it, the format and the dimensions from the
header before any pixel is decoded (a 100000x100000 PNG is a few hundred bytes), then the pixels, all of
them (a truncated file is refused, never padded with grey as PIL's LOAD_TRUNCATED_IMAGES would).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import warnings
from typing import TYPE_CHECKING, Any

from sdxl_server.errors import InvalidRequest

if TYPE_CHECKING:
    from PIL.Image import Image

FORMATS = ("PNG", "JPEG", "WEBP")
MIN_SIDE, MAX_SIDE, SIDE_STEP = 64, 2048, 8
MAX_PIXELS = MAX_SIDE * MAX_SIDE
# One image's decoded bytes at most. 8-bit RGBA at 2048x2048 is 16.8 MB raw, so even a PNG stored without
# compression fits; the cap refuses a 100 MB field (on an endpoint whose body limit was raised) before
# base64-decoding it, which would hold 75 MB more in memory for an image the pixel limit refuses anyway.
MAX_IMAGE_BYTES = 20_000_000
MAX_ENCODED_CHARS = (MAX_IMAGE_BYTES + 2) // 3 * 4 + 1000  # the base64 text of that, plus a data: URL prefix
# Each scan of a JPEG is a pass over every pixel, and a scan can be 16 bytes: a 1 MB progressive JPEG of
# repeated scans decodes for a quarter of an hour, past any time limit (decoding is not generation) and
# beyond stopping. libjpeg-turbo's advice is a scan limit (TurboJPEG's TJPARAM_SCANLIMIT, djpeg -maxscans,
# 500 in its fuzzers); encoders write about ten.
MAX_JPEG_SCANS = 500
# Resampling of diffusers' VaeImageProcessor (resample="lanczos", reducing_gap=None): resized here, the
# pipeline's own resize finds the image at its size already and leaves it as it is.
RESAMPLE = "LANCZOS"

_DATA_URL = re.compile(r"data:[\w.+/-]*(?:;[\w.+=-]+)*;base64,", re.IGNORECASE)
_KNOWN = {  # what other files start with, to say what was sent instead of "unknown format"
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"%PDF": "PDF",
    b"<svg": "SVG",
    b"<?xml": "SVG or other XML",
    b"\x00\x00\x00\x0cjP": "JPEG 2000",
    b"\x00\x00\x01\x00": "ICO",
}
# warnings.catch_warnings swaps the process-wide filter list; two decodes at once must not restore each
# other's. (The size checks below do not depend on it: they refuse far below PIL's bomb threshold.)
_WARNINGS = threading.Lock()


def too_long_message(field: str, chars: int) -> str:
    """The refusal for a field over the encoded-size cap."""
    return (
        f"{field}: {chars / 1e6:.1f} million characters of base64, over the {MAX_IMAGE_BYTES / 1e6:g} MB an image "
        f"of at most {MAX_SIDE}x{MAX_SIDE} pixels needs: send a JPEG or WebP, or a smaller image"
    )


def decode(text: str, field: str) -> Image:
    """A PNG, JPEG or WebP from base64 (a data: URL too): its first frame, upright (EXIF orientation), RGB.

    Raises InvalidRequest on `field` for anything else: not base64, another format, a side outside
    64..2048 (read from the header: a decompression bomb is never decoded), truncated or corrupt data.
    """
    raw = _bytes(text, field)
    _check_scans(raw, field)
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with _WARNINGS, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=list(FORMATS))
    except UnidentifiedImageError:
        if (kind := _allowed_kind(raw)) is not None:  # the right signature, then a header PIL gives up on
            raise _bad(field, f"not a complete {kind} image (truncated or corrupt): send the whole file") from None
        raise _bad(field, f"{_what(raw)} is not an image this server reads: send a PNG, JPEG or WebP") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise _bad(
            field,
            f"its header says over {Image.MAX_IMAGE_PIXELS} pixels: at most {MAX_SIDE}x{MAX_SIDE} (it was not decoded)",
        ) from None
    except Exception:  # a header PIL cannot parse: SyntaxError, struct.error, ValueError, ...
        kind = _allowed_kind(raw) or "PNG, JPEG or WebP"
        raise _bad(field, f"not a complete {kind} image (its header is corrupt)") from None
    kind = {"WEBP": "WebP"}.get(image.format or "", image.format or "PNG, JPEG or WebP")
    _check_size(image.size, field)
    try:
        image.load()  # frame 0 of an animation; raises on truncated data (LOAD_TRUNCATED_IMAGES is False)
        upright = ImageOps.exif_transpose(image) or image
        if upright.mode.startswith("I"):  # 16-bit grayscale: convert("RGB") alone clips it at 255, white
            upright = upright.convert("I").point(lambda value: value / 257).convert("L")
        return upright.convert("RGB")  # diffusers' load_image does this (and nothing more)
    except Exception:  # OSError "truncated", zlib errors, ValueError on broken chunks, ...
        raise _bad(field, f"not a complete {kind} image (truncated or corrupt): send the whole file") from None
    finally:
        image.close()


def check_lengths(instances: Any) -> None:
    """A 100 MB image field is refused for its length, before pydantic copies it or base64 decodes it."""
    for i, instance in enumerate(instances if isinstance(instances, list) else []):
        for key in ("image", "mask_image"):
            text = instance.get(key) if isinstance(instance, dict) else None
            if isinstance(text, str) and len(text) > MAX_ENCODED_CHARS:
                field = f"instances[{i}].{key}"
                raise InvalidRequest(too_long_message(field, len(text)), field=field)


def mode(fields: list[tuple[str | None, str | None]]) -> str:
    """The mode of instances given as (image, mask_image): each has an image or none does, a mask or none
    does, and a mask needs an image."""
    for i, (image, mask) in enumerate(fields):
        if mask is not None and image is None:
            raise _bad(
                f"instances[{i}].mask_image",
                f"a mask needs an image to repaint (inpainting): add instances[{i}].image or leave mask_image out",
            )
    for slot, key in enumerate(("image", "mask_image")):
        having = [pair[slot] is not None for pair in fields]
        if any(having) and not all(having):
            i = having.index(not having[0])
            raise _bad(
                f"instances[{i}].{key}",
                f"instances[0] {'has' if having[0] else 'has no'} {key} and instances[{i}] "
                f"{'has' if having[i] else 'has none'}: every instance of a request has one or none does "
                "(send them as separate requests)",
            )
    image, mask = fields[0]
    if image is None:
        return "text-to-image"
    return "image-to-image" if mask is None else "inpainting"


def inputs(
    fields: list[tuple[str, str | None]], width: int | None, height: int | None
) -> tuple[tuple[int, int], list[tuple[Image, Image | None]]]:
    """Decode each instance's (image, mask_image) once; the output size (width and height where given,
    else the images' own, which must then be one size and a multiple of 8); each image RGB and each mask
    "L" at that size."""
    decoded = []
    for i, (image_text, mask_text) in enumerate(fields):
        image = decode(image_text, f"instances[{i}].image")
        mask = None if mask_text is None else decode(mask_text, f"instances[{i}].mask_image")
        if mask is not None and mask.size != image.size:
            raise _bad(
                f"instances[{i}].mask_image",
                f"the mask is {_wxh(mask.size)} and the image {_wxh(image.size)}: they must be the same size",
            )
        decoded.append((image, mask))
    size = (width or decoded[0][0].width, height or decoded[0][0].height)
    for i, (image, _) in enumerate(decoded):
        own = (width or image.width, height or image.height)  # the sides the image gives
        if own != size:
            raise _bad(
                f"instances[{i}].image",
                f"{_wxh(image.size)}, and instances[0].image is {_wxh(decoded[0][0].size)}: without "
                "parameters.width and height every image must be one size (give them: images are resized to them)",
            )
        if own[0] % SIDE_STEP or own[1] % SIDE_STEP:
            raise _bad(
                f"instances[{i}].image",
                f"{_wxh(image.size)} is not a multiple of {SIDE_STEP} on each side: give parameters.width and "
                "height (the image is resized to them) or resize it; sdxlctl predict does this for you",
            )
    return size, [(to_size(image, size), None if mask is None else to_mask(mask, size)) for image, mask in decoded]


def to_size(image: Image, size: tuple[int, int]) -> Image:
    """The image at `size`, resized as diffusers' VaeImageProcessor resizes (Lanczos), or itself."""
    if image.size == size:
        return image
    from PIL import Image as PILImage

    return image.resize(size, resample=PILImage.Resampling[RESAMPLE])


def to_mask(image: Image, size: tuple[int, int]) -> Image:
    """A decoded (RGB) mask at `size`, grayscale: diffusers' mask processor resizes first, then converts."""
    return to_size(image, size).convert("L")


def _bytes(text: str, field: str) -> bytes:
    found = _DATA_URL.match(text)
    body = text[found.end() :] if found else text
    if "".join(body.split()) == "":
        raise _bad(field, "empty: give the base64 of a PNG, JPEG or WebP image")
    if body.startswith("data:"):
        raise _bad(field, "a data: URL must say ;base64, (data:image/png;base64,...)")
    try:
        raw = base64.b64decode("".join(body.split()), validate=True)  # MIME line breaks are fine
    except (binascii.Error, ValueError):
        raise _bad(
            field, "not base64: give the base64 of a PNG, JPEG or WebP image (standard alphabet, padded)"
        ) from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise InvalidRequest(too_long_message(field, len(text)), field=field)
    return raw


def _check_size(size: tuple[int, int], field: str) -> None:
    width, height = size
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise _bad(field, f"{width}x{height} pixels: at most {MAX_SIDE}x{MAX_SIDE}; resize it (it was not decoded)")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise _bad(field, f"{width}x{height} pixels: at least {MIN_SIDE} on each side")


def _check_scans(raw: bytes, field: str) -> None:
    if _allowed_kind(raw) != "JPEG":
        return
    # In entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so FF DA starts a scan
    # or sits in a metadata segment (an EXIF thumbnail's scan, stray bytes): a count never below the scans.
    scans = raw.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise _bad(
            field,
            f"a JPEG of {scans} scans: at most {MAX_JPEG_SCANS} (each is a pass over every pixel; it was not "
            "decoded): save it again as a baseline JPEG, a PNG or a WebP",
        )


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _allowed_kind(raw: bytes) -> str | None:
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if raw.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WebP"
    return None


def _what(raw: bytes) -> str:
    head = raw[:64].lstrip()
    for magic, name in _KNOWN.items():
        if head.startswith(magic):
            return f"a {name} file"
    return "this data"


def _bad(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}", field=field)
