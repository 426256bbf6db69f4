"""Time `sdxlctl --help` (and other light commands) against `python -c pass`, in one run.

    python bench/cli_startup.py [--runs 20]

Prints a markdown table of median and p90 wall time per command, and the ratio to bare Python.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "sdxlctl --help": [sys.executable, "-m", "sdxlctl", "--help"],
    "sdxlctl status": [sys.executable, "-m", "sdxlctl", "status"],
    "sdxlctl --version": [sys.executable, "-m", "sdxlctl", "--version"],
    "sdxlctl cost --compare": [sys.executable, "-m", "sdxlctl", "cost", "--compare", "--json"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.runs):  # interleaved, so drift hits every command alike
            for name, command in COMMANDS.items():
                started = time.perf_counter()
                subprocess.run(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["python -c pass"])
    print(
        f"{datetime.now(UTC):%Y-%m-%d}, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, {args.runs} runs each, interleaved\n"
    )
    print("| command | median ms | p90 ms | x python -c pass |")
    print("| --- | --- | --- | --- |")
    for name, samples in times.items():
        samples.sort()
        p90 = samples[int(0.9 * (len(samples) - 1))]
        print(
            f"| {name} | {statistics.median(samples) * 1000:.0f} | {p90 * 1000:.0f} | "
            f"{statistics.median(samples) / base:.1f} |"
        )


if __name__ == "__main__":
    main()
