"""Cold start of the model server: the floor (reading the weights' bytes), the server's phases, faster loaders.

    python bench/coldstart.py [--folder /tmp/sdxl-coldstart] [--runs 3] [--only floor,loaders,server]
        [--json bench/results/DATE-coldstart.json]

Writes random-sdxl weights once in the published layout (`*.fp16.safetensors` in each component folder, plus
tokenizers, scheduler and model_index.json) under --folder, then measures, each time from a cold page cache
(the weight files evicted with posix_fadvise(DONTNEED), checked with mincore):
  floor   reading every weight file's bytes, one file after another and one thread per file; warm too
  loaders each way of loading the pipeline onto the CPU (LOADERS), in a fresh process, until every weight
          page is in memory: a memory-mapped load is lazy, so its pages are touched and that time counted
  server  `python -m sdxl_server` from process start to health 200, with the phases from its JSON log
Runs are interleaved (floor, loaders, server, then again), so the drift of a shared machine hits each alike;
the summary gives medians. Loaders must give identical tensors: each one's checksum is compared to the
baseline's on the first round. Timings live here, never in tests (tests/bench/test_coldstart.py runs this
on the tiny model and asserts only that it measures what it says).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coldstart_loaders import LOADERS, SERVER_PATH, WEIGHTS, read_file

LOADERS_SCRIPT = Path(__file__).resolve().parent / "coldstart_loaders.py"
MODELS = ("tiny", "random-sdxl")
PAGE = mmap.PAGESIZE


# ---- the weights on disk ---------------------------------------------------------------------------------


def prepare(folder: Path, model: str) -> Path:
    """The model's fp16 weights in the published layout under `folder`, written once (renamed when complete)."""
    if (folder / "model_index.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    subprocess.run([sys.executable, str(LOADERS_SCRIPT), "prepare", model, str(partial)], check=True, env=_quiet_env())
    partial.rename(folder)
    return folder


def weight_files(folder: Path) -> list[Path]:
    """Every weight file the pipeline loads, biggest first."""
    files = [f for name in WEIGHTS for f in (folder / name).glob("*.safetensors")]
    return sorted(files, key=lambda f: f.stat().st_size, reverse=True)


# ---- the page cache --------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_bytes(path: Path) -> int:
    """How many of the file's bytes are in the page cache (mincore on a shared read-only mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = (size + PAGE - 1) // PAGE
            vector = ctypes.create_string_buffer(pages)
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return min(size, sum(byte & 1 for byte in vector.raw) * PAGE)
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def evict(files: list[Path]) -> float:
    """Drop the files' clean pages from the page cache (no root needed); returns the fraction still cached."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped: a file written moments ago must reach the disk first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    total = sum(f.stat().st_size for f in files)
    return sum(resident_bytes(f) for f in files) / total if total else 0.0


# ---- (a) the floor ---------------------------------------------------------------------------------------


def floor(files: list[Path]) -> dict[str, Any]:
    """Seconds to read every weight file: cold one after another, cold one thread per file, then warm."""
    result: dict[str, Any] = {"bytes": sum(f.stat().st_size for f in files)}
    for name, parallel in (("cold_serial_s", False), ("cold_parallel_s", True)):
        result[f"{name[:-2]}_cached_before"] = evict(files)
        started = time.perf_counter()
        if parallel:
            with ThreadPoolExecutor(len(files)) as pool:
                list(pool.map(read_file, files))
        else:
            for path in files:
                read_file(path)
        result[name] = time.perf_counter() - started
    started = time.perf_counter()
    for path in files:
        read_file(path)
    result["warm_s"] = time.perf_counter() - started
    result["cold_s"] = min(result["cold_serial_s"], result["cold_parallel_s"])
    return result


def run_loader(loader: str, folder: Path, files: list[Path], *, verify: bool) -> dict[str, Any]:
    """One loader in a fresh process, from a cold page cache."""
    # LOADER@warm: the same without evicting, after the previous run: what is not reading the disk.
    name, warm = loader.removesuffix("@warm"), loader.endswith("@warm")
    cached = sum(resident_bytes(f) for f in files) / sum(f.stat().st_size for f in files) if warm else evict(files)
    command = [sys.executable, str(LOADERS_SCRIPT), "load", name, str(folder)] + (["--verify"] if verify else [])
    done = subprocess.run(command, capture_output=True, text=True, env=_quiet_env())
    if done.returncode != 0:
        return {"loader": loader, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"cached_before": cached}


def _quiet_env() -> dict[str, str]:
    quiet = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return os.environ | quiet | {"DIFFUSERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}


# ---- (b) the server --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_server(folder: Path, files: list[Path], *, dtype: str, warmup: str, timeout_s: float) -> dict[str, Any]:
    """`python -m sdxl_server` from a cold page cache: seconds to health 200, and what its log says of phases."""
    cached = evict(files)
    port = _free_port()
    env = _quiet_env() | {
        "PYTHONPATH": str(SERVER_PATH),
        "SDXL_MODEL": str(folder),
        "SDXL_DEVICE": "cpu",
        "SDXL_DTYPE": dtype,
        "SDXL_OPTIMIZE": "none",
        "SDXL_WARMUP": warmup,
        "SDXL_HOST": "127.0.0.1",
        "AIP_HTTP_PORT": str(port),
        "SDXL_CACHE_DIR": str(folder.parent / f"{folder.name}-server-cache"),
    }
    lines: list[tuple[float, str]] = []
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "sdxl_server"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = process.stdout
    assert output is not None
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter() - started, ln) for ln in output))
    reader.start()
    health, health_s = f"http://127.0.0.1:{port}/health", None
    try:
        while health_s is None and process.poll() is None and time.perf_counter() - started < timeout_s:
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    health_s = time.perf_counter() - started if response.status == 200 else None
            except urllib.error.HTTPError as exc:  # 503 while loading, and for good once loading failed
                if b'"failed"' in exc.read():
                    break
            except OSError:  # refused until uvicorn listens
                pass
            time.sleep(0.05)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join()
    result: dict[str, Any] = {"health_s": health_s, "cached_before": cached, "log": {}, "phases": {}}
    for at, line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if not isinstance(entry, dict) or "message" not in entry:
                continue
            result["log"].setdefault(entry["message"], round(at, 3))
            for key, value in entry.items():
                if isinstance(value, int | float) and (key.endswith("_s") or key.endswith("seconds")):
                    result["phases"][key] = value
    if health_s is None:
        result["error"] = "no health 200: " + " | ".join(line.strip() for _, line in lines[-3:])
    return result


# ---- the run ---------------------------------------------------------------------------------------------


def _median(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if isinstance(s.get(key), int | float)]
    return round(statistics.median(values), 3) if values else None


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    packages = ("torch", "diffusers", "transformers", "safetensors", "accelerate")
    found = {name: version(name) for name in packages}
    with contextlib.suppress(ImportError):
        found["fastsafetensors"] = version("fastsafetensors")
    return found | {"python": platform.python_version()}


def _server_code() -> dict[str, Any]:
    """Which server was measured: the commit, and whether its folder had uncommitted changes."""
    git = ["git", "-C", str(SERVER_PATH)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    status = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True, text=True)
    if commit.returncode != 0:
        return {"path": str(SERVER_PATH), "commit": None}
    return {"path": str(SERVER_PATH), "commit": commit.stdout.strip(), "uncommitted": bool(status.stdout.strip())}


def _machine() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
                return f"{os.cpu_count()} x {line.split(':', 1)[1].strip()}, {memory:.0f} GiB"
    return platform.machine()


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Medians per measurement, and the targets: load <= 1.5x floor, health <= 2x floor + import."""
    floor_s = _median(results["floor"], "cold_s")
    summary: dict[str, Any] = {
        "floor_cold_s": floor_s,
        "floor_cold_serial_s": _median(results["floor"], "cold_serial_s"),
        "floor_cold_parallel_s": _median(results["floor"], "cold_parallel_s"),
        "floor_warm_s": _median(results["floor"], "warm_s"),
        "loaders": {},
    }
    for loader, samples in results["loaders"].items():
        keys = ("import_s", "load_s", "touch_s", "total_s", "start_s", "max_rss_gb")
        row: dict[str, Any] = {key: _median(samples, key) for key in keys}
        row["x_floor"] = round(row["total_s"] / floor_s, 2) if row["total_s"] and floor_s else None
        row["errors"] = sorted({s["error"] for s in samples if "error" in s})
        summary["loaders"][loader] = row
    summary["server"] = {}
    for warmup, servers in results["server"].items():
        phases = [s["phases"] for s in servers]
        import_s = _median(phases, "import_s")
        summary["server"][warmup] = {
            "health_s": _median(servers, "health_s"),
            "phases": {key: _median(phases, key) for key in sorted({k for p in phases for k in p})},
            "log_at_s": {key: _median([s["log"] for s in servers], key) for key in servers[0]["log"]},
            "errors": sorted({s["error"] for s in servers if "error" in s}),
            "target_load_s": round(1.5 * floor_s, 2) if floor_s else None,
            "target_health_s": round(2 * floor_s + import_s, 2) if floor_s and import_s else None,
        }
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/sdxl-coldstart"))
    parser.add_argument("--model", choices=MODELS, default="random-sdxl")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="floor,loaders,server", help="comma-separated: floor, loaders, server")
    parser.add_argument(
        "--loaders", default=",".join(LOADERS), help="comma-separated, from LOADERS; NAME@warm: without evicting"
    )
    parser.add_argument("--dtype", default="fp16", help="SDXL_DTYPE of the server (fp16: the files' own)")
    parser.add_argument(
        "--warmup",
        action="append",
        help="SDXL_WARMUP of the server, once per value each round (default none; 64x64 is the smallest size)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds a server may take to be healthy")
    parser.add_argument("--json", type=Path, help="write the raw results and the summary here")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    loaders = [name for name in args.loaders.split(",") if name]
    if unknown := {name.removesuffix("@warm") for name in loaders} - set(LOADERS):
        parser.error(f"--loaders: unknown {', '.join(sorted(unknown))}; choose from {', '.join(LOADERS)}")
    folder = prepare(args.folder, args.model)
    files = weight_files(folder)
    results: dict[str, Any] = {
        "date": f"{datetime.now(UTC):%Y-%m-%dT%H:%MZ}",
        "machine": _machine(),
        "load_average": os.getloadavg(),
        "versions": _versions(),
        "server_code": _server_code(),
        "model": args.model,
        "settings": {"dtype": args.dtype, "warmup": args.warmup, "optimize": "none", "device": "cpu"},
        "files": {str(f.relative_to(folder)): f.stat().st_size for f in files},
        "floor": [],
        "loaders": {name: [] for name in loaders if "loaders" in only},
        "server": {warmup: [] for warmup in args.warmup or ["none"] if "server" in only},
    }
    for run in range(args.runs):  # interleaved: drift on a shared machine hits each measurement alike
        if "floor" in only:
            results["floor"].append(floor(files))
            _progress("floor", results["floor"][-1], "cold_s")
        for loader in results["loaders"]:
            results["loaders"][loader].append(run_loader(loader, folder, files, verify=run == 0))
            _progress(loader, results["loaders"][loader][-1], "total_s")
        for warmup in results["server"]:
            sample = run_server(folder, files, dtype=args.dtype, warmup=warmup, timeout_s=args.timeout)
            results["server"][warmup].append(sample)
            _progress(f"server (warm-up {warmup})", sample, "health_s")
        _save(args.json, results)  # after each round: a run stopped early keeps what it measured
    checks = {n: s[0].get("checksums") for n, s in results["loaders"].items() if s and s[0].get("checksums")}
    results["identical_tensors"] = len({json.dumps(c, sort_keys=True) for c in checks.values()}) <= 1
    results["summary"] = summarise(results)
    _save(args.json, results)
    print(json.dumps(results["summary"], indent=1))
    return results


def _save(path: Path | None, results: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")


def _progress(name: str, sample: dict[str, Any], key: str) -> None:
    value = sample.get(key)
    shown = f"{value:.2f} s" if isinstance(value, float) else sample.get("error", "?")
    print(f"{datetime.now(UTC):%H:%M:%S} {name}: {shown}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
