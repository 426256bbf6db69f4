"""SDXL's work per image by size: FLOPs of the UNets and the VAE decoder the server ships, counted by torch.

    python bench/flops.py [--write]     # prints the table; --write puts it in sdxlctl/pricing/latency.json

Counted with torch.utils.flop_counter on the meta device (no weights, no GPU, a few seconds) from the
component configs in containers/model/sdxl_server/configs: the base UNet one step with guidance (batch 2, 77
tokens), the refiner's UNet the same, the VAE decoding one latent. Square sides from 256 to 2048. sdxlctl's
estimates (sdxlctl/pricing/speed.py) scale each GPU's seconds per 1024x1024 image by this work at the
image's pixel count: attention grows faster than the pixels (2048x2048 is 5.3x the work of 1024x1024 for 4x
the pixels), so a plain pixel ratio would be wrong both ways. A GPU runs small images at a lower efficiency
than large ones; the estimate does not model that (it would take a GPU to measure).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "containers" / "model" / "sdxl_server" / "configs"
LATENCY = ROOT / "sdxlctl" / "pricing" / "latency.json"
SIDES = (256, 512, 768, 1024, 1280, 1536, 1792, 2048)


def count(sides: tuple[int, ...] = SIDES) -> list[dict[str, float]]:
    """TFLOP per base step, refiner step and VAE decode at each square side."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    def unet(folder: Path) -> torch.nn.Module:
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).half()

    with torch.device("meta"):
        base, refiner = unet(CONFIGS / "sdxl-base-1.0"), unet(CONFIGS / "sdxl-refiner-1.0")
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "sdxl-base-1.0" / "vae")).half()

    def tflop(call: object) -> float:
        with FlopCounterMode(display=False) as counter:
            call()  # type: ignore[operator]
        return round(counter.get_total_flops() / 1e12, 3)

    rows = []
    for side in sides:
        with torch.device("meta"):
            latent = torch.zeros(2, 4, side // 8, side // 8, dtype=torch.half)

            def step(model: torch.nn.Module, text: int, pooled: int, ids: int, x: torch.Tensor = latent) -> object:
                tokens = torch.zeros(2, 77, text, dtype=torch.half)
                added = {"text_embeds": torch.zeros(2, pooled, dtype=torch.half), "time_ids": torch.zeros(2, ids)}
                timesteps = torch.tensor([999, 999])
                return lambda: model(x, timesteps, encoder_hidden_states=tokens, added_cond_kwargs=added)

            one = torch.zeros(1, 4, side // 8, side // 8, dtype=torch.half)
            rows.append(
                {
                    "side": side,
                    "per_step": tflop(step(base, 2048, 1280, 6)),
                    "refiner_per_step": tflop(step(refiner, 1280, 1280, 5)),
                    "vae_decode": tflop(lambda one=one: vae.decode(one)),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="update sdxlctl/pricing/latency.json")
    args = parser.parse_args(argv)
    rows = count()
    for row in rows:
        print(f"{row['side']:>5}  base step {row['per_step']:8.3f}  refiner step {row['refiner_per_step']:8.3f}"
              f"  vae decode {row['vae_decode']:8.3f} TFLOP")  # fmt: skip
    if args.write:
        data = json.loads(LATENCY.read_text())
        data["work_tflop"]["by_side"] = {
            "source": "bench/flops.py: torch.utils.flop_counter on the meta device from the shipped configs, "
            "square images; a size between two rows is read at its pixel count",
            "rows": rows,
        }
        LATENCY.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
