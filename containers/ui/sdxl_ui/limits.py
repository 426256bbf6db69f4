"""The model server's ranges and names, as the page offers them. The UI image cannot import the server
(another image) and a Vertex endpoint proxies only predict, so they are written here; a test keeps them
equal to the server's schema and the CLI's options. Two are configurable, passed by sdxlctl the way it
passes them to the server: `[model] max_images` as SDXL_UI_MAX_IMAGES (the server's SDXL_MAX_IMAGES), and
the endpoint's request byte limit as SDXL_UI_MAX_REQUEST_BYTES (the server's SDXL_MAX_REQUEST_BYTES)."""

MIN_STEPS, MAX_STEPS = 1, 150
MIN_GUIDANCE, MAX_GUIDANCE = 0, 30
MIN_SIDE, MAX_SIDE, SIDE_STEP = 64, 2048, 8
DEFAULT_MAX_IMAGES = 4  # the server's SDXL_MAX_IMAGES default
DEFAULT_MAX_REQUEST_BYTES = 1_500_000  # the server's SDXL_MAX_REQUEST_BYTES default: Vertex's shared endpoint

# The samplers the server builds per request (sdxl_server.schedulers.SCHEDULERS), with names people read.
# Euler is SDXL 1.0's own. The three marked x2 call the UNet twice a step: twice the time per step.
SCHEDULERS: tuple[tuple[str, str], ...] = (
    ("euler", "Euler (SDXL's default)"),
    ("euler_a", "Euler ancestral"),
    ("dpmpp_2m", "DPM++ 2M"),
    ("dpmpp_2m_karras", "DPM++ 2M Karras"),
    ("dpmpp_sde_karras", "DPM++ SDE Karras (x2 time per step)"),
    ("ddim", "DDIM"),
    ("heun", "Heun (x2 time per step)"),
    ("unipc", "UniPC"),
    ("kdpm2", "KDPM2 (x2 time per step)"),
)
DEFAULT_SCHEDULER = "euler"

# Image-to-image and inpainting: 0 < strength <= 1; the defaults are the server's (cog-sdxl's prompt_strength).
MAX_STRENGTH = 1.0
MIN_STRENGTH_OFFERED = 0.05  # the slider's low end: the server takes any strength above 0
DEFAULT_STRENGTH = {"image-to-image": 0.8, "inpainting": 1.0}

# The refiner, when the server has one: how it is used, and where the base hands over (0 < f < 1).
REFINE_MODES: tuple[tuple[str, str], ...] = (
    ("none", "None"),
    ("expert_ensemble", "Expert ensemble (text to image)"),
    ("base_image", "Refine the base image"),
)
DEFAULT_HIGH_NOISE_FRAC = 0.8

# What a visitor may upload (the UI may be public on Cloud Run): bytes Gradio accepts, and pixels Pillow decodes
# in this process. Generous, since uploads are fitted down to the server's 2048 a side: a 48-megapixel phone photo
# passes; a decompression bomb (a small file whose header claims a giant image) is refused before decoding.
MAX_UPLOAD_BYTES = 50_000_000
MAX_UPLOAD_PIXELS = 50_000_000
