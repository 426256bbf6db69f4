"""The import graph of sdxlctl/: one direction (cli -> core -> targets -> gcp), no cycles, google only in gcp/.

Read from the source with ast, so that an import inside a function (where the heavy ones live) or under
TYPE_CHECKING counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sdxlctl"

# Lower numbers are lower layers: a module may import one below it, or one of its own group at its level.
LAYERS: dict[str, int] = {
    "sdxlctl": 0,  # the package itself: __version__
    "sdxlctl.errors": 0,
    "sdxlctl.lora_sources": 0,  # the model server's rules for LoRA sources, copied: imports nothing
    "sdxlctl.gpus": 1,
    "sdxlctl.model_config": 1,  # [model], split from config (which imports it back)
    "sdxlctl.config": 2,
    "sdxlctl.state": 2,
    "sdxlctl.inputs": 2,  # the sampler and refine names, which pricing counts too
    "sdxlctl.loras": 2,  # --lora flags, the server's LoRA refusals, the checks before `lora push`: plain data
    "sdxlctl.steps": 3,
    "sdxlctl.server_env": 3,
    "sdxlctl.pricing": 3,
    "sdxlctl.client": 3,
    "sdxlctl.outputs": 3,
    "sdxlctl.context": 3,
    "sdxlctl.batch": 3,  # `sdxlctl batch` as plain data: the prompts file, the manifest
    "sdxlctl.gcp": 4,
    "sdxlctl.local": 5,
    "sdxlctl.vertex": 5,
    "sdxlctl.live_prices": 5,  # cost --live: the Cloud Billing catalog (gcp) into a price table
    "sdxlctl.lora_ops": 5,  # lora push's upload (gcp) and the local server's cached adapters (client)
    "sdxlctl.cloudrun": 6,  # runs target vertex's image, as its accounts and grants: one build, one set of names
    "sdxlctl.core": 7,
    "sdxlctl.batch.door": 7,  # the door of `sdxlctl batch`: prices it, hands it to the target
    "sdxlctl.cli": 8,
    "sdxlctl.__main__": 9,
}
# What the command line may use: the door, the config, the errors, the state, the result types it renders,
# and the GPU table its --gpu choices come from. Never a target, never gcp/.
CLI_MAY_IMPORT = {"sdxlctl", "sdxlctl.core", "sdxlctl.config", "sdxlctl.errors", "sdxlctl.state", "sdxlctl.steps"}
CLI_MAY_IMPORT |= {
    "sdxlctl.gpus",
    "sdxlctl.cli",
    "sdxlctl.inputs",
    "sdxlctl.loras",
    "sdxlctl.batch",
    "sdxlctl.batch.door",
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it; `from a import b` is a.b where b is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            base = node.module or ""
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in `base` itself, not only its modules
                found.add(base)
    return found


GRAPH = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def group(module: str) -> str:
    """The entry of LAYERS a module belongs to: itself, or the package above it that has one."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return ".".join(parts[:end])
    raise AssertionError(f"{module} has no layer: add it to LAYERS")


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        group(module)


def test_imports_point_down_only() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        for imported in targets:
            if imported == group(module) and module.startswith(imported + "."):
                continue  # a module of a package reading its own package (a sibling reached through it)
            mine, theirs = group(module), group(imported)
            down = LAYERS[theirs] < LAYERS[mine]
            if not (down or mine == theirs):
                wrong.append(f"{module} -> {imported} ({LAYERS[mine]} -> {LAYERS[theirs]})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    cycles = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for imported in sorted(GRAPH[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_the_command_line_reaches_targets_only_through_core() -> None:
    wrong = {
        f"{module} -> {imported}"
        for module in GRAPH
        if group(module) == "sdxlctl.cli"
        for imported in GRAPH[module]
        if group(imported) not in CLI_MAY_IMPORT
    }
    assert not wrong, sorted(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_google_is_imported_only_in_gcp(module: str) -> None:
    if group(module) == "sdxlctl.gcp":
        return
    google = sorted(m for m in imports(MODULES[module]) if m == "google" or m.startswith("google."))
    assert not google, f"{module} imports {google}: only sdxlctl/gcp/ may"


def test_only_core_decides_the_target() -> None:
    """`config.target` is read by core (to dispatch), by render (to say it) and by config (to check what only
    one target can use), nowhere else."""
    readers = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "target"
                and isinstance(node.value, ast.Name)
                and node.value.id == "config"
            ):
                readers.add(module)
    # config: to refuse a file among [model] loras where the server cannot read it (a check, not a dispatch);
    # batch.door: the dispatch of `sdxlctl batch`, beside core (core.py is at its size cap)
    assert readers <= {"sdxlctl.core", "sdxlctl.batch.door", "sdxlctl.cli.render", "sdxlctl.config"}, sorted(readers)


def test_every_target_is_one_module_in_the_dispatch() -> None:
    from sdxlctl import cloudrun, core, local, vertex
    from sdxlctl.config import Config

    assert {"local": local, "vertex": vertex, "cloudrun": cloudrun} == core.TARGETS
    assert set(core.TARGETS) == set(Config.model_fields["target"].annotation.__args__)  # type: ignore[union-attr]


def test_no_file_is_over_the_limit() -> None:
    long = {module: n for module, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_gpu_table_is_the_only_list_of_gpus() -> None:
    """A GPU's machine, quota and billing SKU live in gpus.py, so a new GPU is one entry there; elsewhere only
    the default may be named."""
    from sdxlctl.config import Deploy
    from sdxlctl.gpus import GPUS

    default = Deploy.model_fields["gpu"].default
    named = sorted(
        f"{module}:{node.lineno} {node.value!r}"
        for module, path in MODULES.items()
        if module != "sdxlctl.gpus"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value in set(GPUS) - {default}
    )
    assert not named, named
