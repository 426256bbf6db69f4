"""sdxlctl predict's generation modes against the local target: image-to-image, inpainting, a sampler, the
refiner, input images fitted to the request limit (size, bytes), and the usage errors.

One tiny deployment (with the tiny refiner) serves the module; the usage errors need none, they are refused
before any request. Input images are real files, read back by Pillow.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from sdxlctl import inputs
from sdxlctl.errors import UsageError
from sdxlctl.state import Resource, StateStore
from tests.cli.local_deploy import local_deployment
from tests.conftest import Cli, Result
from tests.servers import Server, free_port


def noise(path: Path, size: tuple[int, int], fmt: str = "PNG", **options: object) -> Path:
    """Random pixels: what compresses worst, so its bytes are predictable from its size."""
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(path, fmt, **options)
    return path


def flat(path: Path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB") -> Path:
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)
    return path


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """`sdxlctl deploy` of the tiny model with the tiny refiner, for the whole module; torn down after."""
    folder = tmp_path_factory.mktemp("modes")
    port = str(free_port())  # warm-up at the smallest size: ready sooner, and warm-up is not what is tested here
    env = {"SDXLCTL_LOCAL_SERVER_PORT": port, "SDXLCTL_MODEL_REFINER": "tiny", "SDXLCTL_MODEL_WARMUP": "64x64"}
    with local_deployment(folder, env):
        yield folder, env


@pytest.fixture
def predict(cli: Cli, deployed: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Cli:
    """cli('predict', ...) against the module's deployment; relative paths are in the test's own tmp_path."""
    folder, env = deployed
    monkeypatch.chdir(folder)  # where the state file names the running server

    def run(*args: str) -> Result:
        files = (str(tmp_path / a) if a.endswith((".png", ".jpg", ".webp")) else a for a in args)
        return cli("predict", *files, env=env)

    return run


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


# ---------------------------------------------------------------- each mode, end to end


def test_image_to_image_uses_the_image(predict: Cli, tmp_path: Path) -> None:
    flat(tmp_path / "red.png", (96, 64), (220, 30, 30))
    flat(tmp_path / "blue.png", (96, 64), (30, 30, 220))
    common = ("--seed", "7", "--steps", "4", "--json")
    red = predict("a fox", "--image", "red.png", "--strength", "0.6", "-o", "from-red.png", *common)
    assert red.code == 0, red.err
    result = json.loads(red.out)
    assert (result["width"], result["height"], result["notes"]) == (96, 64, [])  # the image's own size, sent as is
    blue = predict("a fox", "--image", "blue.png", "--strength", "0.6", "-o", "from-blue.png", *common)
    text = predict("a fox", "--width", "96", "--height", "64", "-o", "text.png", *common)
    assert blue.code == 0 and text.code == 0, blue.err + text.err
    # Same seed and prompt: only the input image differs, so it reached the generation
    assert len({pixels(tmp_path / f) for f in ("from-red.png", "from-blue.png", "text.png")}) == 3


def test_inpainting_with_a_mask_of_another_size(predict: Cli, tmp_path: Path) -> None:
    flat(tmp_path / "in.png", (96, 64), (220, 30, 30))
    flat(tmp_path / "mask.png", (48, 32), (255, 255, 255), mode="L")
    result = predict("a fox", "--image", "in.png", "--mask", "mask.png", "--steps", "3", "-o", "out.png")
    assert result.code == 0, result.err
    assert "mask.png 48x32 resized to the image's 96x64" in result.err
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (96, 64)


def test_a_scheduler_changes_the_image_and_its_names_complete(predict: Cli, tmp_path: Path) -> None:
    common = ("a fox", "--seed", "3", "--steps", "4", "--width", "64", "--height", "64")
    default = predict(*common, "-o", "euler.png")
    karras = predict(*common, "--scheduler", "dpmpp-2m-karras", "-o", "karras.png")
    assert default.code == 0 and karras.code == 0, default.err + karras.err
    assert pixels(tmp_path / "euler.png") != pixels(tmp_path / "karras.png")
    # As the server and `sdxlctl cost` spell it, in any case: the same sampler.
    spelled = predict(*common, "--scheduler", "DPMPP_2M_Karras", "-o", "spelled.png")
    assert spelled.code == 0, spelled.err
    assert pixels(tmp_path / "spelled.png") == pixels(tmp_path / "karras.png")

    import typer

    from sdxlctl.cli import commands  # noqa: F401  (registers the commands)
    from sdxlctl.cli.app import app

    command = typer.main.get_command(app).commands["predict"]  # type: ignore[attr-defined]
    param = next(p for p in command.params if p.name == "scheduler")
    with command.make_context("predict", ["x"], resilient_parsing=True) as context:
        offered = [item.value for item in param.shell_complete(context, "dpmpp")]
    assert offered == ["dpmpp-2m", "dpmpp-2m-karras", "dpmpp-sde-karras"]


@pytest.mark.parametrize(
    "args",
    [("--refine", "expert-ensemble", "--high-noise-frac", "0.5"), ("--refine", "base-image", "--refine-steps", "4")],
)
def test_the_refiner_runs_both_ways(predict: Cli, tmp_path: Path, args: tuple[str, ...]) -> None:
    common = ("a fox", "--seed", "5", "--steps", "4", "--width", "64", "--height", "64")
    result = predict(*common, *args, "-o", "refined.png")
    assert result.code == 0, result.err
    with Image.open(tmp_path / "refined.png") as out:
        assert out.size == (64, 64)
    assert predict(*common, "-o", "base.png").code == 0
    assert pixels(tmp_path / "refined.png") != pixels(tmp_path / "base.png")  # the refiner changed the image


def test_an_image_over_the_request_limit_is_re_encoded_and_the_file_kept(predict: Cli, tmp_path: Path) -> None:
    big = noise(tmp_path / "big.png", (640, 640))  # ~1.2 MB, 1.6 MB as base64: over the local 1.5 MB
    before = big.read_bytes()
    big.chmod(0o444)  # read only: sdxlctl never writes the user's file
    result = predict("a fox", "--image", "big.png", "--steps", "1", "--strength", "1", "-o", "out.webp", "--json")
    assert result.code == 0, result.err
    (note,) = json.loads(result.out)["notes"]
    assert note.startswith("big.png 1.2 MB re-encoded as JPEG q") and "to fit the local server's 1.5 MB" in note
    assert big.read_bytes() == before


# ---------------------------------------------------------------- the refiner's refusal, on a server without one


def test_refine_on_a_server_without_a_refiner_says_how_to_get_one(
    cli: Cli, tmp_path: Path, plain_server: Server
) -> None:
    server = Resource(kind="local-server", name="sdxl-server", target="local", url=plain_server.url)
    StateStore(tmp_path / ".sdxlctl").record("sdxl", server)
    result = cli("predict", "a fox", "--refine", "base-image", "--steps", "2", "--width", "64", "--height", "64")
    assert result.code == 1
    assert "400" in result.err and "SDXL_REFINER" in result.err and "[model] refiner" in result.err
    assert not (tmp_path / "out.png").exists()


def test_the_names_are_the_servers() -> None:
    """sdxlctl cannot import the server (another install): its copies of the names and numbers are kept
    equal here: the options' choices, the sizes it fits images to, what cost counts."""
    from sdxl_server import schema, steps
    from sdxl_server.schedulers import SCHEDULERS
    from sdxlctl import pricing

    assert inputs.SCHEDULERS == schema.SCHEDULER_NAMES
    assert inputs.REFINE == schema.REFINE_MODES
    twice = {name for name, sampler in SCHEDULERS.items() if sampler.unet_calls == 2}
    assert set(inputs.SECOND_ORDER) == set(pricing.speed.TWO_PASS_SAMPLERS) == twice
    assert (inputs.MIN_SIDE, inputs.MAX_SIDE) == (schema.MIN_SIDE, schema.MAX_SIDE)
    assert schema.Request.high_noise_frac == pricing.speed.HIGH_NOISE_FRAC  # the dataclass default
    assert pricing.speed.BASE_IMAGE_STRENGTH == steps.BASE_IMAGE_STRENGTH


# ---------------------------------------------------------------- usage errors: refused before any request


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--mask", "m.png"), "--mask needs --image"),
        (("--strength", "0.5"), "--strength needs --image"),
        (("--image", "in.png", "--refine", "expert-ensemble"), "text-to-image only"),
        (("--high-noise-frac", "0.5"), "--high-noise-frac applies to --refine expert-ensemble only"),
        (("--refine", "expert-ensemble", "--refine-steps", "3"), "--refine-steps applies to --refine base-image"),
        (("--image", "missing.png"), "--image missing.png: no such file"),
        (("--image", "."), "--image .: is a folder"),
        (("--image", "notes.txt/in.png"), "--image notes.txt/in.png: cannot read it (Not a directory)"),
        (("--image", "notes.txt"), "--image notes.txt is not an image"),
        (("--image", "cut.png"), "--image cut.png is not a complete PNG"),
        (("--image", "in.png", "--mask", "notes.txt"), "--mask notes.txt is not an image"),
        (("--image", "in.png", "--strength", "0"), "0 is not in 0 < strength <= 1"),
        (("--refine", "expert-ensemble", "--high-noise-frac", "1"), "1 is not between 0 and 1"),
        (("--scheduler", "dpm"), "'dpm' is not one of"),
    ],
)
def test_usage_errors_name_the_option_and_the_fix(
    cli: Cli, tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    flat(tmp_path / "in.png", (64, 64), (1, 2, 3))
    (tmp_path / "notes.txt").write_text("not an image")
    whole = noise(tmp_path / "whole.png", (64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    result = cli("predict", "a fox", *args)
    assert result.code == 2, result.err
    assert expected in " ".join(result.err.split()), result.err
    assert "Traceback" not in result.err and not (tmp_path / "out.png").exists()


# ---------------------------------------------------------------- fitting, without a server


def body(**parameters: object) -> dict[str, object]:
    return {"instances": [{"prompt": "a fox"}], "parameters": {"num_images": 1, "output_format": "png", **parameters}}


LOCAL = inputs.Limit(1_500_000, "local")


def sent_image(sent: inputs.Sent) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(sent.body["instances"][0]["image"])))


def test_sizes_become_multiples_of_8_within_2048_keeping_the_aspect(tmp_path: Path) -> None:
    odd = flat(tmp_path / "odd.png", (1023, 767), (9, 9, 9))
    sent = inputs.attach(body(), inputs.ModeInputs(image=odd), LOCAL)
    assert sent_image(sent).size == (1024, 768)
    assert sent.notes == ["odd.png 1023x767 resized to 1024x768 (multiples of 8, at most 2048 a side)"]
    wide = flat(tmp_path / "wide.jpg", (3000, 1500), (9, 9, 9))
    sent = inputs.attach(body(), inputs.ModeInputs(image=wide), LOCAL)
    assert sent_image(sent).size == (2048, 1024)
    # one side given: the other keeps the image's aspect
    sent = inputs.attach(body(width=512), inputs.ModeInputs(image=wide), LOCAL)
    assert (sent.body["parameters"]["width"], sent.body["parameters"]["height"]) == (512, 256)


def test_a_small_image_is_enlarged_to_64_on_its_shorter_side(tmp_path: Path) -> None:
    """The server takes 64 to 2048 a side: a thumbnail is enlarged as a large photo is shrunk, keeping the
    aspect; only an aspect no size can keep (1x100) is refused, and says so."""
    for size, sent_size in (((1, 1), (64, 64)), ((32, 48), (64, 96)), ((59, 59), (64, 64))):
        small = flat(tmp_path / "small.png", size, (9, 9, 9))
        sent = inputs.attach(body(), inputs.ModeInputs(image=small), LOCAL)
        assert sent_image(sent).size == sent_size
        resized = f"{size[0]}x{size[1]} resized to {sent_size[0]}x{sent_size[1]}"
        assert sent.notes == [f"small.png {resized} (multiples of 8, at least 64 a side)"]
    thin = flat(tmp_path / "thin.png", (1, 100), (9, 9, 9))
    with pytest.raises(UsageError, match=r"1x100: at that aspect no size fits 64\.\.2048 on both sides"):
        inputs.attach(body(), inputs.ModeInputs(image=thin), LOCAL)
    with pytest.raises(UsageError, match=r"1x100: at that aspect"):  # --width alone keeps the aspect: 64x6400
        inputs.attach(body(width=64), inputs.ModeInputs(image=thin), LOCAL)


def test_png_jpeg_webp_go_as_they_are_other_formats_as_png(tmp_path: Path) -> None:
    for name in ("in.png", "in.jpg", "in.webp"):
        path = noise(tmp_path / name, (96, 64), Image.registered_extensions()[Path(name).suffix])
        sent = inputs.attach(body(), inputs.ModeInputs(image=path), LOCAL)
        assert base64.b64decode(sent.body["instances"][0]["image"]) == path.read_bytes() and sent.notes == []
    gif = flat(tmp_path / "in.gif", (96, 64), (9, 9, 9))
    sent = inputs.attach(body(), inputs.ModeInputs(image=gif), LOCAL)
    assert sent_image(sent).format == "PNG" and sent.notes == ["in.gif (GIF) sent as PNG"]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_once_between_sdxlctl_and_the_server(tmp_path: Path, orientation: int) -> None:
    """The server turns an image by its EXIF orientation too: what sdxlctl sends must carry no tag once turned,
    or a photo would arrive turned twice. The server's own decoder reads what is sent."""
    from PIL import ImageOps

    from sdxl_server.images import decode

    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: stored sideways, turn 90 degrees clockwise to show
    stored = Image.new("RGB", (64, 96), (250, 0, 0))
    stored.paste((0, 0, 250), (0, 0, 64, 24))  # a blue band along one edge shows which way it was turned
    photo = tmp_path / "photo.jpg"
    stored.save(photo, quality=100, exif=exif.tobytes())
    with Image.open(photo) as opened:
        upright = ImageOps.exif_transpose(opened).convert("RGB")
    sent = inputs.attach(body(), inputs.ModeInputs(image=photo), LOCAL)
    assert sent_image(sent).getexif().get(0x0112) is None
    seen = decode(sent.body["instances"][0]["image"], "instances[0].image")
    assert seen.size == upright.size == (sent.body["parameters"]["width"], sent.body["parameters"]["height"])
    assert all(abs(a - b) <= 8 for a, b in zip(seen.tobytes(), upright.tobytes(), strict=True))
    assert "photo.jpg turned upright, as its EXIF orientation says" in sent.notes


def test_a_16_bit_grayscale_png_reaches_the_server_as_its_8_bit_values(tmp_path: Path) -> None:
    """Pillow's convert("RGB"), which the server applies as diffusers' load_image does, clips 16-bit values at
    255: sent as it is, a 16-bit scan would arrive white. sdxlctl scales it to 8 bits first."""
    import numpy as np

    from sdxl_server.images import decode

    deep = tmp_path / "scan.png"
    values = (np.arange(96 * 64) * 10).astype(np.uint16).reshape(64, 96)  # 0..61430: 16 bits
    Image.fromarray(values).save(deep)
    with Image.open(deep) as opened:
        assert opened.mode == "I;16"
    expected = np.round(values / 257)
    sent = inputs.attach(body(), inputs.ModeInputs(image=deep), LOCAL)
    seen = decode(sent.body["instances"][0]["image"], "instances[0].image")
    assert np.abs(np.asarray(seen)[..., 0] - expected).max() <= 1


def test_a_large_colour_mask_goes_as_grayscale_png(tmp_path: Path) -> None:
    image = flat(tmp_path / "in.png", (512, 512), (9, 9, 9))
    mask = noise(tmp_path / "mask.png", (512, 512))  # 0.8 MB of colour: the image's share would shrink by that
    sent = inputs.attach(body(), inputs.ModeInputs(image=image, mask=mask), LOCAL)
    encoded = base64.b64decode(sent.body["instances"][0]["mask_image"])
    with Image.open(io.BytesIO(encoded)) as sent_mask:
        assert (sent_mask.format, sent_mask.mode, sent_mask.size) == ("PNG", "L", (512, 512))
    assert len(encoded) < mask.stat().st_size / 2


def test_an_image_that_cannot_fit_names_the_dedicated_endpoint(tmp_path: Path) -> None:
    big = noise(tmp_path / "big.png", (640, 640))
    with pytest.raises(UsageError) as refused:
        inputs.attach(body(), inputs.ModeInputs(image=big), inputs.Limit(150_000, "shared"))
    assert "--image" in refused.value.message and "does not fit the shared endpoint's 0.1 MB" in refused.value.message
    assert '[deploy] endpoint = "dedicated"' in (refused.value.hint or "")


def test_the_request_limit_is_the_targets() -> None:
    from sdxl_server.settings import Settings
    from sdxlctl import core
    from sdxlctl.config import Config

    local = core.request_limit(Config())
    assert (local.bytes, local.where) == (Settings().max_request_bytes, "local")  # the server's own default
    shared = core.request_limit(Config.model_validate({"target": "vertex", "gcp": {"project": "p"}}))
    dedicated = core.request_limit(
        Config.model_validate({"target": "vertex", "gcp": {"project": "p"}, "deploy": {"endpoint": "dedicated"}})
    )
    assert (shared.bytes, dedicated.bytes) == (1_500_000, 10_000_000)
