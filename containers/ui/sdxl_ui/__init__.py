"""The Gradio UI of sdxlctl: talks to a model server (local) or a Vertex AI endpoint (cloud)."""

__version__ = "0.1.0"
