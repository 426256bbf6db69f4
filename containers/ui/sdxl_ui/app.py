"""The Gradio Blocks page: prompt, Generate, a tab per mode, a gallery, and the advanced settings. It never
runs a model."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from typing import Any

from sdxl_ui import limits, loras
from sdxl_ui.backend import Backend, BackendError, Busy
from sdxl_ui.images import ImageProblem
from sdxl_ui.request import Choices, build_body
from sdxl_ui.styles import STYLES

EXAMPLES = [
    "a red fox in the snow, golden hour, telephoto",
    "an isometric cozy reading nook with plants, soft light",
    "a lighthouse on a cliff in a storm, dramatic sky",
    "a bowl of ramen, studio food photography",
]
# Busy (429) or not ready (503): asked again after the answer's Retry-After, as `sdxlctl predict` does;
# a scale-from-zero endpoint can take minutes, so the page gives up after a few tries and says so.
MAX_RETRIES = 4
MAX_RETRY_WAIT_S = 30.0
# Gradio gives every gallery cell a square box as wide as its column, so one image was a full-width
# square cut to the gallery's height (a banner) and a 2x2 grid ran below the fold. Rows that share the
# gallery's height and `contain` show every image whole, at its own aspect: one image fills the gallery,
# four make a 2x2 grid, below the title, prompt and mode tabs. tests/ui/test_browser.py measures this at 1280x800.
GALLERY_HEIGHT = "max(320px, calc(100vh - 300px))"
CSS = """
#gallery .grid-container { height: 100%; }
#gallery .thumbnail-item { aspect-ratio: auto; }
"""
KEEP = None  # in generate's output: leave the gallery as it is


def generate(
    backend: Backend,
    choices: Choices,
    *,
    max_bytes: int = limits.DEFAULT_MAX_REQUEST_BYTES,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[list[Any] | None, str, float | None]]:
    """Ask the backend for images; yield (images or KEEP, a line about them, the seed to show), first a
    "busy, retrying in N s" line for each wait, last the images or what went wrong."""
    from PIL import Image

    seed = choices.seed
    if not choices.prompt or not choices.prompt.strip():
        yield [], "⚠️ Type a prompt first.", seed
        return
    try:
        body, notes = build_body(choices, max_bytes=max_bytes)
    except ImageProblem as exc:
        yield [], f"⚠️ {str(exc)[:1].upper()}{str(exc)[1:]}.", seed
        return
    started = time.monotonic()
    for attempt in range(1, MAX_RETRIES + 2):
        try:
            answer = backend.predict(body)
            break
        except Busy as exc:
            if attempt > MAX_RETRIES:
                yield [], f"⚠️ {exc} (gave up after {MAX_RETRIES} retries)", seed
                return
            wait = min(exc.retry_after_s, MAX_RETRY_WAIT_S)
            state = "busy" if exc.status == 429 else "not ready yet"
            yield KEEP, f"⏳ The model is {state}, retrying in {wait:.0f} s ({attempt} of {MAX_RETRIES})", seed
            sleep(wait)
        except BackendError as exc:
            yield [], f"⚠️ {exc}", seed
            return
    seconds = time.monotonic() - started
    prediction = answer["predictions"][0]
    images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in prediction["images"]]
    seeds = prediction.get("seeds", [])
    seed_text = ", ".join(str(s) for s in seeds)
    info = f"**Seed {seed_text}** · {prediction.get('width')}x{prediction.get('height')} · {seconds:.1f} s"
    if notes:
        info += " · the image was " + "; ".join(notes)
    yield images, info, float(seeds[0]) if seeds else seed


def has_refiner(health: dict[str, Any] | None, configured: bool) -> bool:
    """Whether to offer the refiner: the server's health answer says (local target); where the page cannot
    ask it (None: Vertex AI proxies only predict, or it is still loading), what sdxlctl passed (SDXL_UI_REFINER)."""
    return bool(health.get("refiner")) if health is not None else configured


def build(
    backend: Backend,
    *,
    queue_size: int = 16,
    concurrency: int = 2,
    width: int = 1024,
    height: int = 1024,
    steps: int = 30,
    max_images: int = limits.DEFAULT_MAX_IMAGES,
    max_request_bytes: int = limits.DEFAULT_MAX_REQUEST_BYTES,
    refiner: bool = False,
    lora_names: list[str] | None = None,
) -> Any:
    """The page, wired to `backend`, with a bounded queue in front of it; defaults fit SDXL 1.0. `refiner`:
    whether the server has one, and `lora_names`: its preloaded adapters, where its health cannot say."""
    import gradio as gr

    configured_loras = list(lora_names or [])
    # The menu's entries at start, for a client of the API (which loads no page, so never asks health below):
    # Gradio refuses a value that is not among a menu's entries
    offered_loras = loras.offered(backend.health(), configured_loras)

    with gr.Blocks(title="SDXL", analytics_enabled=False) as page:
        gr.Markdown("# Stable Diffusion XL")
        mode = gr.State("text-to-image")
        with gr.Row():
            prompt = gr.Textbox(
                label="Prompt",
                placeholder="a red fox in the snow, golden hour",
                lines=1,
                max_lines=3,
                scale=5,
                elem_id="prompt",
                autofocus=True,
            )
            button = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
        with gr.Tabs(elem_id="modes"):
            with gr.Tab("Text to image", id="text-to-image") as text_tab:
                pass  # the prompt alone, at the width and height under Advanced
            with gr.Tab("Image to image", id="image-to-image") as image_tab, gr.Row():
                image = gr.Image(
                    label="Image",
                    type="pil",
                    image_mode=None,  # as uploaded: Gradio's convert("RGB") clips 16 bits white; images.rgb does it
                    sources=["upload", "clipboard"],
                    height=320,
                    scale=2,
                    elem_id="init-image",
                )
                strength = gr.Slider(
                    limits.MIN_STRENGTH_OFFERED,
                    limits.MAX_STRENGTH,
                    value=limits.DEFAULT_STRENGTH["image-to-image"],
                    step=0.05,
                    label="Strength",
                    info="how far from the image: 1 ignores it",
                    elem_id="strength",
                )
            with gr.Tab("Inpainting", id="inpainting") as inpaint_tab, gr.Row():
                editor = gr.ImageMask(
                    label="Image: paint over what to repaint",
                    type="pil",
                    image_mode="RGBA",
                    sources=["upload", "clipboard"],
                    layers=False,
                    transforms=(),
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=24),
                    canvas_size=(512, 512),
                    scale=2,
                    visible=False,  # see the tabs' select below
                    elem_id="inpaint-editor",
                )
                inpaint_strength = gr.Slider(
                    limits.MIN_STRENGTH_OFFERED,
                    limits.MAX_STRENGTH,
                    value=limits.DEFAULT_STRENGTH["inpainting"],
                    step=0.05,
                    label="Strength",
                    info="1 repaints the painted part from scratch",
                    elem_id="inpaint-strength",
                )
        info = gr.Markdown(elem_id="info")
        gallery = gr.Gallery(
            label="Images",
            columns=2,
            height=GALLERY_HEIGHT,
            object_fit="contain",
            format="png",
            elem_id="gallery",
            buttons=["download", "fullscreen"],
        )
        with gr.Accordion("Advanced", open=False):
            negative = gr.Textbox(label="Negative prompt", placeholder="blurry, low quality")
            with gr.Row():
                style = gr.Dropdown(choices=[(name, key) for key, name in STYLES], value="none", label="Style")
                scheduler = gr.Dropdown(
                    choices=[(name, key) for key, name in limits.SCHEDULERS],
                    value=limits.DEFAULT_SCHEDULER,
                    label="Sampler",
                    elem_id="sampler",
                )
                seed = gr.Number(label="Seed", value=None, precision=0, minimum=0, maximum=2**32 - 1)
                randomize = gr.Checkbox(label="Randomize seed", value=True)
            with gr.Row():
                width = gr.Slider(limits.MIN_SIDE, limits.MAX_SIDE, value=width, step=64, label="Width")
                height = gr.Slider(limits.MIN_SIDE, limits.MAX_SIDE, value=height, step=64, label="Height")
            with gr.Row():
                steps = gr.Slider(limits.MIN_STEPS, limits.MAX_STEPS, value=steps, step=1, label="Steps")
                guidance = gr.Slider(limits.MIN_GUIDANCE, limits.MAX_GUIDANCE, value=5.0, step=0.5, label="Guidance")
                # a slider needs two ends: with max_images = 1 there is nothing to choose
                count = gr.Slider(1, max(max_images, 2), value=1, step=1, label="Images", visible=max_images > 1)
            # Shown at page load when the server has a refiner (see has_refiner)
            with gr.Row(visible=False, elem_id="refiner") as refiner_row:
                refine = gr.Radio(
                    choices=[(name, key) for key, name in limits.REFINE_MODES],
                    value="none",
                    label="Refiner",
                    elem_id="refine",
                )
                high_noise_frac = gr.Slider(
                    0.05,
                    0.95,
                    value=limits.DEFAULT_HIGH_NOISE_FRAC,
                    step=0.05,
                    label="High noise fraction",
                    info="expert ensemble: where the base model hands over to the refiner",
                )
            # The server's preloaded LoRA adapters, by name; shown (at page load) only when it has any
            with gr.Row(visible=bool(offered_loras), elem_id="lora") as lora_row:
                lora = gr.Dropdown(
                    choices=loras.menu(offered_loras),
                    value=loras.NONE,
                    label="LoRA adapter",
                    info="one of the model server's preloaded adapters",
                    elem_id="lora-menu",
                )
                lora_scale = gr.Slider(
                    loras.MIN_SCALE,
                    loras.MAX_SCALE,
                    value=loras.DEFAULT_SCALE,
                    step=loras.SCALE_STEP,
                    label="LoRA scale",
                    info="how strongly the adapter applies: 0 not at all, negative away from it",
                    elem_id="lora-scale",
                )
        gr.Examples(EXAMPLES, inputs=[prompt])

        def run(*values: Any) -> Iterator[tuple[Any, str, float | None]]:
            for images, info, seed in generate(backend, Choices(*values), max_bytes=max_request_bytes):
                yield (gr.skip() if images is KEEP else images), info, seed

        # in Choices' order
        inputs = [prompt, negative, style, seed, randomize, width, height, steps, guidance, count, scheduler]
        inputs += [refine, high_noise_frac, mode, image, strength, editor, inpaint_strength, lora, lora_scale]
        outputs = [gallery, info, seed]
        button.click(run, inputs, outputs, api_name="generate")
        prompt.submit(run, inputs, outputs, api_name=False)
        # The editor sizes its canvas when it mounts, and mounted with its tab it read a width of 0 (an
        # upload then sat off-center, half outside the view): it is shown only once its tab is laid out,
        # by the answer to the tab's select, and hidden when another tab is chosen.
        for tab in (text_tab, image_tab, inpaint_tab):
            shown = gr.update(visible=tab.id == "inpainting")
            tab.select(_constant((tab.id, shown)), None, [mode, editor], api_name=False, show_progress="hidden")

        def on_load() -> tuple[Any, Any, Any]:
            """What the server has now (one health call a page): the refiner and the LoRA adapters."""
            health = backend.health()
            names = loras.offered(health, configured_loras)
            return (
                gr.update(visible=has_refiner(health, refiner)),
                gr.update(visible=bool(names)),
                gr.update(choices=loras.menu(names), value=loras.NONE),
            )

        page.load(on_load, None, [refiner_row, lora_row, lora], api_name=False, show_progress="hidden")
    return page.queue(max_size=queue_size, default_concurrency_limit=concurrency)


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value
