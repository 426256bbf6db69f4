"""SDXL model server for Vertex AI custom containers (and anywhere else HTTP runs)."""

__version__ = "0.1.0"
