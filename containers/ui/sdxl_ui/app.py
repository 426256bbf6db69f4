"""The Gradio Blocks page: prompt, Generate, a gallery, and the advanced settings. It never runs a model."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from typing import Any

from sdxl_ui import limits
from sdxl_ui.backend import Backend, BackendError, Busy
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
# four make a 2x2 grid. tests/ui/test_browser.py measures this at 1280x800.
GALLERY_HEIGHT = "max(320px, calc(100vh - 240px))"
CSS = """
#gallery .grid-container { height: 100%; }
#gallery .thumbnail-item { aspect-ratio: auto; }
"""
KEEP = None  # in generate's output: leave the gallery as it is


def generate(
    backend: Backend,
    prompt: str,
    negative: str,
    style: str,
    seed: float | None,
    randomize: bool,
    width: float,
    height: float,
    steps: float,
    guidance: float,
    num_images: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[list[Any] | None, str, float | None]]:
    """Ask the backend for images; yield (images or KEEP, a line about them, the seed to show), first a
    "busy, retrying in N s" line for each wait, last the images or what went wrong."""
    from PIL import Image

    if not prompt or not prompt.strip():
        yield [], "⚠️ Type a prompt first.", seed
        return
    instance: dict[str, Any] = {"prompt": prompt.strip()}
    if negative and negative.strip():
        instance["negative_prompt"] = negative.strip()
    if style and style != "none":
        instance["style"] = style
    if not randomize and seed is not None:
        instance["seed"] = int(seed)
    body = {
        "instances": [instance],
        "parameters": {
            "num_inference_steps": int(steps),
            "guidance_scale": float(guidance),
            "width": int(width),
            "height": int(height),
            "num_images": int(num_images),
            "output_format": "jpeg",
            "quality": 92,
        },
    }
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
    yield images, info, float(seeds[0]) if seeds else seed


def build(
    backend: Backend,
    *,
    queue_size: int = 16,
    concurrency: int = 2,
    width: int = 1024,
    height: int = 1024,
    steps: int = 30,
    max_images: int = limits.DEFAULT_MAX_IMAGES,
) -> Any:
    """The page, wired to `backend`, with a bounded queue in front of it; defaults fit SDXL 1.0."""
    import gradio as gr

    with gr.Blocks(title="SDXL", analytics_enabled=False) as page:
        gr.Markdown("# Stable Diffusion XL")
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
        gr.Examples(EXAMPLES, inputs=[prompt])

        def run(*values: Any) -> Iterator[tuple[Any, str, float | None]]:
            for images, info, seed in generate(backend, *values):
                yield (gr.skip() if images is KEEP else images), info, seed

        inputs = [prompt, negative, style, seed, randomize, width, height, steps, guidance, count]
        outputs = [gallery, info, seed]
        button.click(run, inputs, outputs, api_name="generate")
        prompt.submit(run, inputs, outputs, api_name=False)
    return page.queue(max_size=queue_size, default_concurrency_limit=concurrency)
