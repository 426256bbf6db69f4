"""`python -m sdxlctl`."""

from sdxlctl.cli import main

main()
