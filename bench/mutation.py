"""Mutation testing of the modules the issue named, as a benchmark of the suite (not part of CI).

    python bench/mutation.py [--targets pricing,state] [--minutes 20] [--children 2] [--worktree]

Each target mutates one module (or a few functions) and runs only the tests that bear on it, with mutmut 3
(installed into a folder of its own, never into .venv: see TOOLS). It works on a copy of the committed tree
(HEAD, or the working tree with --worktree) under --work, never in this checkout, and writes the scores
and the surviving mutants to bench/results/<date>-mutation.json; docs/mutation.md reads them.

Score = detected / (detected + survived + no tests), where detected is killed or timed out (a mutant
that makes a test hang is caught too). Mutants not reached before --minutes ran out are "not checked"
and counted nowhere.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = "mutmut==3.8.1"
TOOLS = Path(os.environ.get("SDXL_MUTATION_TOOLS", Path(tempfile.gettempdir()) / "sdxl-mutation-tools"))
# The server and UI packages live below containers/; lifted to the top of the copy, their import names
# (sdxl_server.schema) are also their paths, as mutmut needs, and tests import the copy, not the checkout.
LIFTED = {"sdxl_server": "containers/model/sdxl_server", "sdxl_ui": "containers/ui/sdxl_ui"}


@dataclass(frozen=True)
class Target:
    """One module (or some of its functions) and the tests that should notice a change in it."""

    source: str  # the top-level package mutmut copies and instruments
    files: tuple[str, ...]  # the files mutated (mutmut's only_mutate)
    tests: tuple[str, ...]  # pytest arguments: the narrow selection
    functions: tuple[str, ...] = ()  # mutant name globs; empty: every function of the files


TARGETS = {
    "pricing": Target(
        "sdxlctl",
        ("sdxlctl/pricing/__init__.py",),
        # the live-catalog and status tests start the emulator (and a model server) for each mutant
        ("tests/pricing", "-k", "not live_prices_come and not live_falls_back and not status_shows"),
    ),
    "state": Target(
        "sdxlctl",
        ("sdxlctl/state.py",),
        ("tests/cli/test_state.py", "tests/cli/test_os_errors.py", "tests/cli/test_processes.py"),
    ),
    "schema": Target(
        "sdxl_server",
        ("sdxl_server/schema.py",),
        ("tests/model_server/test_schema_limits.py", "tests/model_server/test_app.py"),
    ),
    "inventory-teardown": Target(
        "sdxlctl",
        ("sdxlctl/vertex/inventory.py", "sdxlctl/local/__init__.py", "sdxlctl/local/processes.py"),
        ("tests/cloud", "tests/cli", "-k", "teardown"),
        functions=(
            "sdxlctl.vertex.inventory.x_inventory__mutmut_*",
            "sdxlctl.vertex.inventory.x_plan_teardown__mutmut_*",
            "sdxlctl.vertex.inventory.x_teardown__mutmut_*",
            "sdxlctl.local.x_teardown_plan__mutmut_*",
            "sdxlctl.local.x_teardown__mutmut_*",
            "sdxlctl.local.x__stop_local__mutmut_*",
            "sdxlctl.local.processes.x_stop__mutmut_*",
            "sdxlctl.local.processes.x_owns__mutmut_*",
        ),
    ),
}


def install_tools(python: str) -> None:
    """mutmut and what it needs into TOOLS, at the versions .venv already has wherever they overlap."""
    if (TOOLS / "mutmut").is_dir():
        return
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write("\n".join(line for line in frozen.splitlines() if "==" in line))
    try:
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--target", str(TOOLS), "-c", pins.name, MUTMUT], check=True
        )
    finally:
        os.unlink(pins.name)


def lay_out(work: Path, worktree: bool) -> str:
    """A copy of the project in `work`: HEAD (or the working tree) with the container packages lifted."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if worktree:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout.decode()
        for name in filter(None, listed.split("\0")):
            if (ROOT / name).is_file():
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, work / name)
        commit += "+worktree"
    else:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(work, filter="data")
    for name, path in LIFTED.items():
        shutil.copytree(work / path, work / name)
    return commit


def configure(work: Path, target: Target) -> None:
    """mutmut's settings for this target (setup.cfg: the project's pyproject.toml stays as it is)."""
    others = sorted(p.name for p in work.iterdir() if p.name not in {target.source, "mutants", "setup.cfg"})
    lines = [
        "[mutmut]",
        f"source_paths = {target.source}",
        "only_mutate =\n" + "\n".join(f"    {f}" for f in target.files),
        "pytest_add_cli_args_test_selection =\n" + "\n".join(f"    {t}" for t in target.tests),
        # -p no:randomly etc. are absent here; -x stops a mutant's run at the first failing test
        "pytest_add_cli_args =\n    -x\n    -q\n    -p\n    no:cacheprovider",
        "also_copy =\n" + "\n".join(f"    {name}" for name in others),
        # torch and grpc are not fork-safe once imported: workers fork from a clean server process
        "process_isolation = forkserver",
        "use_git_change_detection = false",
        "",
    ]
    (work / "setup.cfg").write_text("\n".join(lines))


def run_target(name: str, target: Target, args: argparse.Namespace, python: str) -> dict[str, object]:
    work = args.work / name
    commit = lay_out(work, args.worktree)
    configure(work, target)
    env = {**os.environ, "PYTHONPATH": str(TOOLS), "HF_HUB_OFFLINE": "1"}
    command = [python, "-m", "mutmut", "run", "--max-children", str(args.children), *target.functions]
    started = time.monotonic()
    log = (work / "mutmut.log").open("w")
    process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        process.wait(timeout=args.minutes * 60)
        finished = True
    except subprocess.TimeoutExpired:  # keep what was checked; the rest is reported as not checked
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        finished = False
    log.close()
    seconds = round(time.monotonic() - started)
    statuses, survivors = collect(work, target, python, env)
    counts = Counter(statuses.values())
    detected = counts["killed"] + counts["timeout"]
    judged = detected + counts["survived"] + counts["no tests"]
    result = {
        "target": name,
        "files": list(target.files),
        "functions": list(target.functions),
        "tests": list(target.tests),
        "commit": commit,
        "finished": finished,
        "exit_code": process.returncode,
        "seconds": seconds,
        "mutants": len(statuses),
        "counts": dict(sorted(counts.items())),
        "score": round(detected / judged, 3) if judged else None,
        "survivors": survivors,
    }
    print(f"{name}: {result['counts']} score {result['score']} in {seconds} s{'' if finished else ' (capped)'}")
    if process.returncode:  # mutmut's own account: a failing clean run, a test that breaks under it
        print((work / "mutmut.log").read_text()[-3000:], file=sys.stderr)
    return result


def collect(
    work: Path, target: Target, python: str, env: dict[str, str]
) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Each mutant's status from mutmut's .meta files, and the diff of each survivor (at most 150)."""
    import fnmatch

    sys.path.insert(0, str(TOOLS))
    from mutmut.stats import status_by_exit_code

    statuses: dict[str, str] = {}
    for file in target.files:
        meta = work / "mutants" / (file + ".meta")
        if not meta.is_file():
            continue
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if not target.functions or any(fnmatch.fnmatch(key, glob) for glob in target.functions):
                statuses[key] = status_by_exit_code[code]
    alive = sorted(k for k, s in statuses.items() if s in {"survived", "no tests"})[:150]
    # one process for every diff (`mutmut show` per mutant reloads everything each time)
    script = (
        "import json, sys\n"
        "from mutmut.mutation.diff_apply import get_diff_for_mutant\n"
        "print(json.dumps({k: get_diff_for_mutant(k) for k in sys.argv[1:]}))\n"
    )
    shown = subprocess.run([python, "-c", script, *alive], cwd=work, env=env, capture_output=True, text=True)
    diffs = json.loads(shown.stdout) if shown.returncode == 0 and alive else {}
    survivors = [
        {
            "mutant": key,
            "status": statuses[key],
            "diff": "\n".join(line for line in diffs.get(key, "").splitlines() if line.startswith(("+", "-", "@@"))),
        }
        for key in alive
    ]
    return statuses, survivors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--minutes", type=float, default=20, help="cap per target; the rest stays unchecked")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-mutation")
    parser.add_argument("--worktree", action="store_true", help="the working tree, not HEAD")
    parser.add_argument("--parallel", action="store_true", help="run the targets at the same time")
    parser.add_argument("--out", type=Path, help="default bench/results/<date>-mutation.json")
    args = parser.parse_args()
    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else sys.executable
    install_tools(python)
    versions = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('pytest'))"], capture_output=True, text=True
    ).stdout.split()
    names = args.targets.split(",")
    with ThreadPoolExecutor(len(names) if args.parallel else 1) as pool:  # each target is a process
        results = list(pool.map(lambda name: run_target(name, TARGETS[name], args, python), names))
    record = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.platform()}",
        "python": platform.python_version(),
        "tools": {"mutmut": MUTMUT.split("==")[1], "pytest": versions[0] if versions else "?"},
        "children": args.children,
        "parallel": args.parallel,
        "minutes_cap": args.minutes,
        "results": results,
    }
    out = args.out or ROOT / "bench" / "results" / f"{datetime.now(UTC):%Y-%m-%d}-mutation.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
