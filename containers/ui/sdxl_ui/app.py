"""The Gradio Blocks page: prompt, Generate, a gallery, and the advanced settings. It never runs a model."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from sdxl_ui.backend import Backend, BackendError
from sdxl_ui.styles import STYLES

EXAMPLES = [
    "a red fox in the snow, golden hour, telephoto",
    "an isometric cozy reading nook with plants, soft light",
    "a lighthouse on a cliff in a storm, dramatic sky",
    "a bowl of ramen, studio food photography",
]


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
) -> tuple[list[Any], str, float | None]:
    """Ask the backend for images; return (images, a line about them, the seed to show)."""
    from PIL import Image

    if not prompt or not prompt.strip():
        return [], "⚠️ Type a prompt first.", seed
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
    try:
        answer = backend.predict(body)
    except BackendError as exc:
        return [], f"⚠️ {exc}", seed
    seconds = time.monotonic() - started
    prediction = answer["predictions"][0]
    images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in prediction["images"]]
    seeds = prediction.get("seeds", [])
    seed_text = ", ".join(str(s) for s in seeds)
    info = f"**Seed {seed_text}** · {prediction.get('width')}x{prediction.get('height')} · {seconds:.1f} s"
    return images, info, float(seeds[0]) if seeds else seed


def build(
    backend: Backend,
    *,
    queue_size: int = 16,
    concurrency: int = 2,
    width: int = 1024,
    height: int = 1024,
    steps: int = 30,
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
            height="auto",
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
                width = gr.Slider(64, 2048, value=width, step=64, label="Width")
                height = gr.Slider(64, 2048, value=height, step=64, label="Height")
            with gr.Row():
                steps = gr.Slider(1, 100, value=steps, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=5.0, step=0.5, label="Guidance")
                count = gr.Slider(1, 4, value=1, step=1, label="Images")
        gr.Examples(EXAMPLES, inputs=[prompt])

        def run(*values: Any) -> tuple[list[Any], str, float | None]:
            return generate(backend, *values)

        inputs = [prompt, negative, style, seed, randomize, width, height, steps, guidance, count]
        outputs = [gallery, info, seed]
        button.click(run, inputs, outputs, api_name="generate")
        prompt.submit(run, inputs, outputs, api_name=False)
    return page.queue(max_size=queue_size, default_concurrency_limit=concurrency)
