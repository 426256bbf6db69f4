"""What the page sends for image-to-image and inpainting: sizes the server takes, bodies under the byte
limit, and the mask painted in the editor. The page itself is in test_browser_modes.py."""

from __future__ import annotations

import base64
import io
import json
import random
from typing import Any

import pytest
from PIL import Image, ImageDraw

from sdxl_ui.images import ImageProblem, encode, fitting_size, from_editor
from sdxl_ui.request import Choices, build_body


def _noise(width: int, height: int) -> Image.Image:
    """Pixels no codec can shrink much: the worst case for the byte limit."""
    return Image.frombytes("RGB", (width, height), random.Random(1).randbytes(width * height * 3))


def _decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.mark.parametrize(
    ("size", "fitted"),
    [
        ((1023, 767), (1016, 760)),  # down to multiples of 8
        ((1024, 1024), (1024, 1024)),
        ((4096, 3072), (2048, 1536)),  # at most 2048 a side, same aspect
        ((32, 48), (64, 96)),  # at least 64
    ],
)
def test_sizes_become_ones_the_server_takes(size: tuple[int, int], fitted: tuple[int, int]) -> None:
    assert fitting_size(*size) == fitted


def test_a_small_image_goes_as_lossless_png_at_its_size() -> None:
    image = _noise(64, 48).resize((128, 96))
    encoded = encode(image)
    assert encoded.notes == [] and encoded.size == (128, 96) and encoded.mask is None
    sent = _decoded(encoded.image)
    assert sent.format == "PNG" and list(sent.convert("RGB").getdata()) == list(image.getdata())


def test_a_large_image_is_made_to_fit_the_byte_limit_and_the_page_says_so() -> None:
    body, notes = build_body(Choices("a fox", mode="image-to-image", image=_noise(1999, 1501)), max_bytes=1_500_000)
    assert len(json.dumps(body).encode()) <= 1_500_000
    width, height = body["parameters"]["width"], body["parameters"]["height"]
    assert width % 8 == height % 8 == 0 and width <= 1999 and abs(width / height - 1999 / 1501) < 0.02
    assert _decoded(body["instances"][0]["image"]).size == (width, height)
    assert any("JPEG" in note and "1.5 MB request limit" in note for note in notes), notes
    assert body["parameters"]["strength"] == 0.8 and "mask_image" not in body["instances"][0]


def test_an_image_that_cannot_fit_is_one_sentence() -> None:
    with pytest.raises(ImageProblem, match=r"does not fit the endpoint's 0\.002 MB request limit"):
        encode(_noise(256, 256), max_bytes=2_000)


def _editor(size: tuple[int, int], strokes: list[tuple[int, int, int, int]]) -> dict[str, Any]:
    background = Image.new("RGBA", size, (20, 120, 200, 255))
    layer = Image.new("RGBA", size, (0, 0, 0, 0))  # the canvas leaves unpainted pixels transparent
    for stroke in strokes:
        ImageDraw.Draw(layer).rectangle(stroke, fill=(255, 255, 255, 160))  # a soft brush: alpha below 255
    return {"background": background, "layers": [layer], "composite": None}


def test_the_mask_is_white_where_the_brush_painted() -> None:
    image, mask = from_editor(_editor((200, 160), [(10, 20, 59, 69)]))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (20, 120, 200)
    assert mask.mode == "L" and mask.size == (200, 160)
    assert mask.getbbox() == (10, 20, 60, 70) and set(mask.getdata()) == {0, 255}


def test_an_inpainting_body_carries_image_mask_and_strength_at_one_size() -> None:
    body, notes = build_body(Choices("a fox", mode="inpainting", editor=_editor((300, 200), [(0, 0, 99, 99)])))
    instance, parameters = body["instances"][0], body["parameters"]
    image, mask = _decoded(instance["image"]), _decoded(instance["mask_image"])
    assert image.size == mask.size == (296, 200) == (parameters["width"], parameters["height"])
    assert mask.getpixel((50, 50)) == 255 and mask.getpixel((200, 150)) == 0
    assert parameters["strength"] == 1.0 and notes == [
        "resized from 300x200 to 296x200 (sides a multiple of 8 from 64 to 2048)"
    ]


@pytest.mark.parametrize(
    ("editor", "message"),
    [
        (None, "upload an image to inpaint first"),
        ({"background": Image.new("RGBA", (64, 64)), "layers": [], "composite": None}, "paint over the part"),
    ],
)
def test_inpainting_without_an_image_or_paint_says_what_to_do(editor: Any, message: str) -> None:
    with pytest.raises(ImageProblem, match=message):
        build_body(Choices("a fox", mode="inpainting", editor=editor))


def test_sampler_and_refiner_choices_reach_the_parameters() -> None:
    body, _ = build_body(Choices("a fox", scheduler="dpmpp_2m_karras", refine="expert_ensemble", high_noise_frac=0.7))
    assert body["parameters"]["scheduler"] == "dpmpp_2m_karras"
    assert body["parameters"]["refine"] == "expert_ensemble" and body["parameters"]["high_noise_frac"] == 0.7
    plain, _ = build_body(Choices("a fox"))
    assert plain["parameters"]["scheduler"] == "euler"
    assert {"refine", "high_noise_frac", "strength"}.isdisjoint(plain["parameters"])
    assert "image" not in plain["instances"][0]


def test_a_16_bit_grayscale_upload_reaches_the_server_as_its_8_bit_values(tmp_path: Any) -> None:
    """Gradio's convert("RGB") on an upload, like the server's, clips 16-bit values at 255: a 16-bit scan
    arrived white. The page takes the upload as it is and scales it to 8 bits itself."""
    import numpy as np
    from gradio.data_classes import ImageData

    from sdxl_server.images import decode
    from sdxl_ui.app import build
    from sdxl_ui.backend import HttpBackend

    values = (np.arange(96 * 64) * 10).astype(np.uint16).reshape(64, 96)  # 0..61430: 16 bits
    Image.fromarray(values).save(tmp_path / "scan.png")
    page = build(HttpBackend("http://127.0.0.1:9"))  # never asked: only the upload's preprocessing runs
    upload = next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == "init-image")
    image = upload.preprocess(ImageData(path=str(tmp_path / "scan.png")))
    body, _ = build_body(Choices("a scan", mode="image-to-image", image=image))
    seen = decode(body["instances"][0]["image"], "instances[0].image")
    assert np.abs(np.asarray(seen)[..., 0] - np.round(values / 257)).max() <= 1
