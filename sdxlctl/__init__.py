"""sdxlctl: Stable Diffusion XL on Google Cloud (and on this machine) from one TOML file."""

__version__ = "0.1.0"
