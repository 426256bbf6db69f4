"""A local emulator of the Google Cloud REST APIs sdxlctl uses (see tests/emulator/README.md)."""
