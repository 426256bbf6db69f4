"""Input images are hostile: every bad one is a 400 naming its field, decided before pixels are decoded
where it can be; good ones arrive RGB (masks "L") at the output size, resized as diffusers resizes."""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
import zlib
from typing import Any

import pytest
from PIL import Image

from sdxl_server import images
from sdxl_server.errors import InvalidRequest
from sdxl_server.schema import Request, parse_request


def encoded(image: Image.Image, fmt: str = "PNG", **options: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode()


def raw_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def gradient(size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """Not flat: a resize that differs from diffusers' would show."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata([((x * 7) % 256, (y * 11) % 256, (x * y) % 256) for y in range(height) for x in range(width)])
    return image.convert(mode)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, built by hand: a few bytes that decode into billions of pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 100_000, 9)  # the start of the first rows; never reached
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def webp_canvas(width: int, height: int) -> bytes:
    """An animated WebP of two 64x64 frames whose canvas (VP8X) says width x height."""
    frames = [Image.new("RGB", (64, 64), color) for color in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buffer.getvalue())
    at = data.index(b"VP8X") + 12
    data[at : at + 6] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


def parse(instances: list[dict[str, Any]], **parameters: Any) -> Request:
    body = {"instances": instances, "parameters": parameters}
    return parse_request(json.dumps(body).encode(), max_images=4, default_size=(1024, 1024), draw_seed=lambda: 1)


def refused(instances: list[dict[str, Any]], **parameters: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        parse(instances, **parameters)
    return raised.value


PNG = encoded(gradient())
JPEG_BYTES = base64.b64decode(encoded(gradient(), "JPEG"))
PNG_BYTES = base64.b64decode(PNG)
WEBP_BYTES = base64.b64decode(encoded(gradient(), "WEBP"))

BAD_IMAGES: list[tuple[str, str, str]] = [
    # (id, the field's text, what the message says)
    ("empty", "", "empty"),
    ("blank", "  \n ", "empty"),
    ("not-base64", "this is not base64!", "not base64"),
    ("base64-unpadded", PNG.rstrip("=")[:-1], "not base64"),
    ("data-url-without-base64", "data:image/png," + PNG, "base64"),
    ("truncated-png", raw_b64(PNG_BYTES[: len(PNG_BYTES) // 2]), "not a complete PNG"),
    ("truncated-jpeg", raw_b64(JPEG_BYTES[: len(JPEG_BYTES) // 2]), "not a complete JPEG"),
    ("truncated-webp", raw_b64(WEBP_BYTES[: len(WEBP_BYTES) // 2]), "not a complete"),
    ("png-header-only", raw_b64(PNG_BYTES[:40]), "not a complete"),
    ("bomb-100000x100000", raw_b64(png_header_only(100_000, 100_000)), "pixels"),
    ("bomb-10000x10000-pil-warning", raw_b64(png_header_only(10_000, 10_000)), "pixels"),
    ("bomb-2049x2048", raw_b64(png_header_only(2049, 2048)), "at most 2048x2048"),
    ("bomb-webp-canvas-16383x16383", raw_b64(webp_canvas(16383, 16383)), "pixels"),
    ("webp-canvas-4000x64", raw_b64(webp_canvas(4000, 64)), "4000x64"),
    ("side-63", encoded(Image.new("RGB", (63, 64))), "at least 64"),
    ("real-4096x4096", encoded(Image.new("RGB", (4096, 4096), "navy")), "4096x4096"),
    ("gif", encoded(gradient(), "GIF"), "GIF"),
    ("bmp", encoded(gradient(), "BMP"), "BMP"),
    ("tiff", encoded(gradient(), "TIFF"), "TIFF"),
    ("pdf", encoded(gradient(), "PDF"), "PDF"),
    ("svg", raw_b64(b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>'), "SVG"),
    ("text", raw_b64(b"hello"), "PNG, JPEG or WebP"),
]


@pytest.mark.parametrize(("text", "says"), [case[1:] for case in BAD_IMAGES], ids=[case[0] for case in BAD_IMAGES])
def test_a_bad_image_is_refused_naming_its_field(text: str, says: str) -> None:
    error = refused([{"prompt": "a fox", "image": text}])
    assert error.status == 400 and error.field == "instances[0].image"
    assert error.message.startswith("instances[0].image: ") and says in error.message, error.message
    mask = refused([{"prompt": "a fox", "image": PNG, "mask_image": text}])
    assert mask.field == "instances[0].mask_image" and says in mask.message


def test_a_bomb_is_refused_from_its_header_and_pil_is_left_as_it_was() -> None:
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 1000
    limit, filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    for size in ((100_000, 100_000), (10_000, 10_000), (4096, 4096)):
        with pytest.raises(InvalidRequest, match=f"{size[0]}x{size[1]} pixels|over"):
            images.decode(raw_b64(png_header_only(*size)), "instances[0].image")
    assert limit == Image.MAX_IMAGE_PIXELS and warnings.filters == filters
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_jpeg_webp_and_data_urls_decode_to_rgb() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        for text in (encoded(gradient(), fmt), f"data:image/{fmt.lower()};base64," + encoded(gradient(), fmt)):
            image = images.decode(text, "instances[0].image")
            assert image.mode == "RGB" and image.size == (96, 64)
    lines = "\n".join(PNG[i : i + 76] for i in range(0, len(PNG), 76))  # `base64` and MIME wrap lines
    assert images.decode(lines, "f").tobytes() == gradient().tobytes()


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "I;16", "1", "CMYK"])
def test_every_pixel_mode_becomes_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = images.decode(encoded(gradient(mode=mode), fmt), "f")
    assert image.mode == "RGB" and image.size == (96, 64)


def test_an_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (64, 64), color) for color in ("red", "lime", "blue")]
    for fmt in ("PNG", "WEBP"):  # APNG and animated WebP
        text = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
        assert images.decode(text, "f").getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_is_applied_as_diffusers_load_image_does() -> None:
    from diffusers.utils import load_image

    source = gradient((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    text = encoded(source, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = images.decode(text, "f")
    assert decoded.size == (64, 96)
    reference = load_image(Image.open(io.BytesIO(base64.b64decode(text))))
    assert decoded.tobytes() == reference.tobytes()


def test_the_image_and_mask_are_resized_exactly_as_diffusers_resizes_them() -> None:
    """Job.image and Job.mask given to a pipeline equal what the pipeline makes of the original itself."""
    from diffusers.image_processor import VaeImageProcessor

    source, mask_source = gradient((200, 120)), gradient((200, 120), "L").point(lambda v: 255 if v > 128 else 0)
    request = parse(
        [{"prompt": "a fox", "image": encoded(source), "mask_image": encoded(mask_source)}], width=128, height=96
    )
    job = request.jobs[0]
    assert (request.width, request.height, request.mode) == (128, 96, "inpainting")
    processor = VaeImageProcessor(vae_scale_factor=8)  # the SDXL pipelines' image and mask processors
    masks = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    expected = processor.resize(source.convert("RGB"), 96, 128)  # load_image converts to RGB first
    assert job.image is not None and job.image.mode == "RGB" and job.image.tobytes() == expected.tobytes()
    expected_mask = masks.convert_to_grayscale(masks.resize(mask_source.convert("RGB"), 96, 128))
    assert job.mask is not None and job.mask.mode == "L" and job.mask.tobytes() == expected_mask.tobytes()
    # At the output size already, the pipelines' own resize leaves them as they are.
    assert processor.resize(job.image, 96, 128).tobytes() == job.image.tobytes()


def test_without_width_and_height_the_image_gives_the_size() -> None:
    request = parse([{"prompt": "a", "image": encoded(gradient((96, 64)))}] * 2)
    assert (request.width, request.height, request.mode, request.strength) == (96, 64, "image-to-image", 0.8)
    assert all(job.image is not None and job.image.tobytes() == gradient().tobytes() for job in request.jobs)
    assert all(job.mask is None for job in request.jobs)
    one_side = parse([{"prompt": "a", "image": encoded(gradient((96, 64)))}], width=128)
    assert (one_side.width, one_side.height) == (128, 64)
    assert one_side.jobs[0].image is not None and one_side.jobs[0].image.size == (128, 64)


def test_an_image_not_a_multiple_of_8_needs_width_and_height() -> None:
    odd = encoded(gradient((1023 // 8, 767 // 8)))  # 127x95
    error = refused([{"prompt": "a", "image": odd}])
    assert error.field == "instances[0].image"
    assert "127x95 is not a multiple of 8 on each side: give parameters.width and height" in error.message
    assert refused([{"prompt": "a", "image": odd}], width=128).field == "instances[0].image"  # height 95
    request = parse([{"prompt": "a", "image": odd}], width=128, height=96)
    assert request.jobs[0].image is not None and request.jobs[0].image.size == (128, 96)


def test_a_mask_of_another_size_is_refused_on_the_mask() -> None:
    error = refused([{"prompt": "a", "image": PNG, "mask_image": encoded(Image.new("L", (64, 64)))}])
    assert error.field == "instances[0].mask_image"
    assert "64x64" in error.message and "96x64" in error.message and "same size" in error.message


@pytest.mark.parametrize(
    ("instances", "field", "says"),
    [
        ([{"prompt": "a", "mask_image": PNG}], "instances[0].mask_image", "needs an image"),
        ([{"prompt": "a", "image": PNG}, {"prompt": "b"}], "instances[1].image", "one or none"),
        ([{"prompt": "a"}, {"prompt": "b", "image": PNG}], "instances[1].image", "one or none"),
        (
            [{"prompt": "a", "image": PNG, "mask_image": PNG}, {"prompt": "b", "image": PNG}],
            "instances[1].mask_image",
            "one or none",
        ),
        (
            [{"prompt": "a", "image": PNG}, {"prompt": "b", "image": encoded(gradient((64, 64)))}],
            "instances[1].image",
            "one size",
        ),
        ([{"prompt": "a", "image": PNG}, {"prompt": "b", "image": "%%%"}], "instances[1].image", "not base64"),
    ],
    ids=["mask-without-image", "image-then-none", "none-then-image", "mask-then-none", "two-sizes", "second-bad"],
)
def test_instances_of_one_request_share_a_mode_and_a_size(
    instances: list[dict[str, Any]], field: str, says: str
) -> None:
    error = refused(instances)
    assert error.field == field and says in error.message, error.message


def test_two_sizes_are_fine_with_width_and_height() -> None:
    request = parse(
        [{"prompt": "a", "image": PNG}, {"prompt": "b", "image": encoded(gradient((64, 64)))}], width=64, height=64
    )
    assert [job.image.size for job in request.jobs if job.image is not None] == [(64, 64), (64, 64)]


def test_a_field_over_the_encoded_cap_is_refused_before_decoding() -> None:
    huge = "A" * (images.MAX_ENCODED_CHARS + 1)  # valid base64 of zeros: refused for its length alone
    error = refused([{"prompt": "a", "image": huge}])
    assert error.field == "instances[0].image" and "send a JPEG or WebP" in error.message
    mask = refused([{"prompt": "a", "image": PNG, "mask_image": huge}])
    assert mask.field == "instances[0].mask_image"
    # Any 8-bit image the pixel limit allows fits under the cap, even stored without compression.
    assert images.MAX_IMAGE_BYTES > 2048 * 2048 * 4 + 2048 * 5 + 100_000


def test_images_are_decoded_only_after_every_other_field_is_good() -> None:
    """A bad parameter wins over a bomb: the cheap checks run first and nothing is decoded for nothing."""
    bomb = raw_b64(png_header_only(100_000, 100_000))
    assert refused([{"prompt": "a", "image": bomb}], quality=0).field == "parameters.quality"
    assert refused([{"prompt": "", "image": bomb}]).field == "instances[0].prompt"
    assert refused([{"prompt": "a", "image": bomb}], strength=2).field == "parameters.strength"


def jpeg_with_scans(extra: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A progressive JPEG with its last scan repeated `extra` times. Each scan costs a pass over the whole
    image: 16 bytes a scan at 2048x2048 is a minute of CPU per 80 KB, a quarter of an hour per request."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 130, 140)).save(buffer, "JPEG", progressive=True, quality=50)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")  # the last scan runs from its SOS marker to the end-of-image marker
    return data[:last] + data[last:-2] * (extra + 1) + b"\xff\xd9"


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidRequest) as raised:
        images.decode(raw_b64(jpeg_with_scans(images.MAX_JPEG_SCANS)), "instances[0].image")
    assert raised.value.field == "instances[0].image"
    assert "scans" in str(raised.value) and str(images.MAX_JPEG_SCANS) in str(raised.value)
    # what encoders write (Pillow's progressive JPEG has 10 scans, mozjpeg's a few more) decodes as before
    assert images.decode(raw_b64(jpeg_with_scans(20)), "instances[0].image").size == (64, 64)


def test_a_16_bit_grayscale_png_keeps_its_values_in_8_bits() -> None:
    """Pillow's convert("RGB") (diffusers' load_image's) clips 16-bit values at 255: the image came out
    white. sdxlctl predict and the UI scale it before sending; a client of the API gets the same."""
    import numpy as np

    values = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16  # 0..65520
    decoded = np.asarray(images.decode(encoded(Image.fromarray(values)), "instances[0].image")).astype(int)
    expected = np.round(values / 257).astype(int)
    assert np.abs(decoded[..., 0] - expected).max() <= 1
    assert (decoded[..., 0] == decoded[..., 2]).all()
