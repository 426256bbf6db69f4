"""Cold start on target cloudrun, by the emulator's path: the first request after scale to zero.

    python bench/coldstart_cloudrun.py [--runs 5] [--probe-scale 0.01]
        [--json bench/results/DATE-coldstart-cloudrun.json]

Starts the emulator (tests/emulator) with real instances, builds and deploys the tiny model through sdxlctl's
CLI (`SDXLCTL_TARGET=cloudrun`), then N times: scales the service to zero, and from the first request on
(which starts `python -m sdxl_server` with PORT, as Cloud Run starts the container) times
  health_s  until health answers 200 through the service's URL (the front end holds it until the startup
            probe passes), with the deployer's ID token
  image_s   until the first image (one 64x64 image, 2 steps) is answered, counted from the same start
Medians in the summary. The startup probe's period is scaled by --probe-scale (the emulator's
world.run_probe_scale): at 1.0 the probe's 10 s period rounds every start up to the next probe, which
measures the probe, not the server. What is not here: a GPU instance's own start (Cloud Run: about 5 s with
drivers), pulling the image, and reading real weights (bench/coldstart.py measures those on this machine).
Timings live here, never in tests (tests/bench/test_coldstart_cloudrun.py runs one round, asserting none).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SERVICE = "sdxl-server"
BODY = {
    "instances": [{"prompt": "a lighthouse", "seed": 1}],
    "parameters": {"num_inference_steps": 2, "width": 64, "height": 64},
}


@contextlib.contextmanager
def emulated(folder: Path, probe_scale: float) -> Iterator[Any]:
    """The emulator with real Cloud Run instances and a GCS emulator, on loopback; yields tests' Emulator."""
    from tests.emulator.app import create_app
    from tests.emulator.core import World
    from tests.emulator.model_servers import ModelServers
    from tests.emulator_fixtures import Emulator
    from tests.servers import gcs_emulator, serve_app

    world = World(polls_to_finish=2)
    world.run_probe_scale = probe_scale
    servers = ModelServers(log_dir=folder)
    with gcs_emulator() as gcs_url:
        try:
            with serve_app(create_app(world, servers=servers, gcs_url=gcs_url)) as server:
                yield Emulator(server.url, gcs_url, world)
        finally:
            servers.stop_all()


def sdxlctl(step: str, env: dict[str, str], cwd: Path) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")} | env | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sdxlctl", step], cwd=cwd, env=full, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise SystemExit(f"sdxlctl {step} failed:\n{done.stderr}")
    return done.stdout


def one_cold_start(emulator: Any, url: str, timeout_s: float) -> dict[str, Any]:
    """Scale to zero, then time the first request's health 200 and the first image from one start."""
    import httpx

    from tests.emulator.core import DEPLOYER
    from tests.emulator.identity import issue

    emulator.scale_to_zero(SERVICE)
    assert emulator.instances(SERVICE) == 0, "the instance did not stop"
    headers = {"Authorization": f"Bearer {issue(emulator.world, DEPLOYER, url)}"}
    starts = emulator.instance_starts(SERVICE)
    started = time.perf_counter()
    health = httpx.get(f"{url}/health", headers=headers, timeout=timeout_s)
    while health.status_code != 200 or health.json().get("status") != "ready":  # loading: asked again
        if time.perf_counter() - started > timeout_s:
            raise SystemExit(f"health never said ready: {health.status_code} {health.text}")
        time.sleep(0.05)
        health = httpx.get(f"{url}/health", headers=headers, timeout=timeout_s)
    health_s = time.perf_counter() - started
    answer = httpx.post(f"{url}/predict", headers=headers, json=BODY, timeout=timeout_s)
    image_s = time.perf_counter() - started
    answer.raise_for_status()
    images = answer.json()["predictions"][0]["images"]
    return {
        "health_s": round(health_s, 3),
        "image_s": round(image_s, 3),
        "images": len(images),
        "new_instances": emulator.instance_starts(SERVICE) - starts,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    packages = ("torch", "diffusers", "transformers", "uvicorn", "starlette", "google-cloud-run", "google-auth")
    return {name: version(name) for name in packages} | {"python": platform.python_version()}


def _machine() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
                return f"{os.cpu_count()} x {line.split(':', 1)[1].strip()}, {memory:.0f} GiB"
    return platform.machine()


def _commit() -> dict[str, Any]:
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "containers/model", "tests/emulator"], capture_output=True, text=True
    )
    return {"commit": commit.stdout.strip() or None, "uncommitted": bool(dirty.stdout.strip())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--probe-scale", type=float, default=0.01, help="the startup probe's period x this")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one cold start may take")
    parser.add_argument("--json", type=Path, help="write the raw results and the summary here")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the tests' servers: one compute thread per process
    with tempfile.TemporaryDirectory(prefix="coldstart-cloudrun-") as tmp:
        folder = Path(tmp)
        with emulated(folder, args.probe_scale) as emulator:
            env = emulator.env(SDXLCTL_TARGET="cloudrun")
            sdxlctl("build", env, folder)
            sdxlctl("deploy", env, folder)
            url = next(s["uri"] for s in emulator.resources()["services"] if s["name"].endswith("/" + SERVICE))
            samples = []
            for run in range(args.runs):
                samples.append(one_cold_start(emulator, url, args.timeout))
                print(f"run {run + 1}/{args.runs}: {json.dumps(samples[-1])}", file=sys.stderr)
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": _versions(),
        "code": _commit(),
        "model": "tiny",
        "request": BODY,
        "probe_scale": args.probe_scale,
        "runs": samples,
        "summary": {
            "runs": len(samples),
            "health_median_s": round(statistics.median(s["health_s"] for s in samples), 3),
            "image_median_s": round(statistics.median(s["image_s"] for s in samples), 3),
        },
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"]))
    return results


if __name__ == "__main__":
    main()
