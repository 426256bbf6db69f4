"""`python -m sdxl_server.fetch DEST`: download SDXL with the fp16-fix VAE into a diffusers folder.

Used by the Dockerfile to bake weights (build argument SDXL_WEIGHTS), and by hand to prepare a folder
for a gs:// bucket (`gcloud storage cp -r DEST gs://bucket/sdxl`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdxl_server.errors import ModelLoadError
from sdxl_server.sources import FP16_FIX_VAE, Placement, load_pipeline


def main(argv: list[str] | None = None) -> int:
    """Download, swap in the VAE, save as fp16 safetensors."""
    parser = argparse.ArgumentParser(prog="python -m sdxl_server.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to write the pipeline to")
    parser.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0", help="Hub repo id")
    parser.add_argument("--vae", default=FP16_FIX_VAE, help="VAE repo id, or 'model' to keep the model's own")
    args = parser.parse_args(argv)
    try:
        pipeline = load_pipeline(args.model, Placement.resolve("cpu", "fp16"), vae=args.vae, cache_dir=args.dest)
    except ModelLoadError as exc:
        print(f"fetch: {exc}", file=sys.stderr)
        return 1
    pipeline.save_pretrained(args.dest, safe_serialization=True)
    print(f"fetch: saved {args.model} (VAE {args.vae}) to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
