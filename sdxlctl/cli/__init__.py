"""The sdxlctl command line: parse, confirm, render. No cloud calls here."""

from sdxlctl.cli.app import app, main

__all__ = ["app", "main"]
