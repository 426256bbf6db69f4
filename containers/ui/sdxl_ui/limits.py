"""The model server's ranges, as sliders offer them. The UI image cannot import the server (another image)
and a Vertex endpoint proxies only predict, so they are written here; a test keeps them equal to the
server's schema and the CLI's options. Only the image count is configurable: sdxlctl passes
`[model] max_images` as SDXL_UI_MAX_IMAGES, the same value it gives the server as SDXL_MAX_IMAGES."""

MIN_STEPS, MAX_STEPS = 1, 150
MIN_GUIDANCE, MAX_GUIDANCE = 0, 30
MIN_SIDE, MAX_SIDE = 64, 2048
DEFAULT_MAX_IMAGES = 4  # the server's SDXL_MAX_IMAGES default
