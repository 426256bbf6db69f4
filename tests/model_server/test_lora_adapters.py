"""Reading one LoRA file (lora/adapters.py): the numbers diffusers itself loads, from each published format,
and a one-line 400 naming the field for every file the slot cannot take. Real files, made in code."""

from __future__ import annotations

import json
import pickle
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from sdxl_server.errors import InvalidRequest
from sdxl_server.lora.adapters import Adapter, Targets, read_adapter
from tests.model_server import loras

FIELD = "parameters.lora[0].source"
ALL_UNET = (*loras.UNET_TARGETS, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


@pytest.fixture(scope="module")
def targets() -> Targets:
    """What the slot covers on the tiny base, with shapes: read_adapter checks against exactly that."""
    from sdxl_server.lora.slots import find_targets
    from sdxl_server.sources import build_tiny_pipeline

    return find_targets(build_tiny_pipeline())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def published(folder: Path) -> Path:
    """A LoRA as diffusers' save_lora_weights writes one, alpha != rank (the metadata carries it)."""
    return loras.tiny_lora(folder / "diffusers", seed=3, rank=4, alpha=2)


@pytest.fixture(scope="module")
def everywhere(folder: Path) -> Path:
    """A LoRA of every slot target in peft's own key layout (lora_A/lora_B throughout, as trainers that save
    get_peft_model_state_dict write). diffusers' layout is no option here: its converter knows only the
    attention names, and a file half in each layout is one diffusers loads only partly (refused below)."""
    mixed = loras.tiny_lora(folder / "mixed", seed=4, rank=4, alpha=8, unet_targets=ALL_UNET)
    return peft_layout(mixed, folder / "peft" / loras.WEIGHT_NAME)


def peft_layout(source: Path, path: Path) -> Path:
    """`source` rewritten with peft's key names throughout, its metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
        metadata = handle.metadata()
    renames = {".lora.down.": ".lora_A.", ".lora.up.": ".lora_B.", ".lora_linear_layer.down.": ".lora_A."}
    renames[".lora_linear_layer.up."] = ".lora_B."
    for old, new in renames.items():
        tensors = {key.replace(old, new): value for key, value in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read(path: Path, targets: Targets) -> Adapter:
    return read_adapter(path, key="k", label=str(path.name), targets=targets, field=FIELD)


def loaded(path: Path) -> dict[str, dict[str, tuple[Any, Any, float]]]:
    """What diffusers puts into the peft layers: load_lora_weights on a fresh tiny base."""
    from peft.tuners.lora import LoraLayer

    from sdxl_server.sources import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="a")
    layers: dict[str, dict[str, tuple[Any, Any, float]]] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer) and "a" in module.lora_A:
                weights = (module.lora_A["a"].weight, module.lora_B["a"].weight, module.scaling["a"])
                layers.setdefault(component, {})[name] = weights
    return layers


def assert_same(adapter: Adapter, expected: dict[str, dict[str, tuple[Any, Any, float]]]) -> None:
    import torch

    assert {c: set(m) for c, m in adapter.layers.items()} == {c: set(m) for c, m in expected.items()}
    for component, modules in expected.items():
        for module, (a, b, scaling) in modules.items():
            got_a, got_b, got_scaling = adapter.layers[component][module]
            assert got_a.dtype == got_b.dtype and got_a.device.type == "cpu"
            # In the file's dtype: diffusers casts to the base's (float32 here) as it loads.
            assert torch.equal(got_a.float(), a.detach()), (component, module)
            assert torch.equal(got_b.float(), b.detach()), (component, module)
            assert got_scaling == pytest.approx(scaling), (component, module)


def test_a_diffusers_file_reads_as_diffusers_loads_it(published: Path, targets: Targets) -> None:
    adapter = read(published, targets)
    assert_same(adapter, loaded(published))
    assert adapter.rank == 4 and adapter.size == published.stat().st_size and adapter.key == "k"
    assert {scaling for c in adapter.layers.values() for _a, _b, scaling in c.values()} == {0.5}  # alpha 2 / r 4


def test_a_peft_file_of_every_slot_target_reads_as_diffusers_loads_it(everywhere: Path, targets: Targets) -> None:
    adapter = read(everywhere, targets)
    assert_same(adapter, loaded(everywhere))
    assert set(adapter.layers["unet"]) == set(targets["unet"])  # tiny_lora's text targets are attention only
    assert {scaling for c in adapter.layers.values() for _a, _b, scaling in c.values()} == {2.0}  # alpha 8 / r 4


def test_a_kohya_file_with_mixed_ranks_and_alphas_reads_as_diffusers_loads_it(
    published: Path, folder: Path, targets: Targets
) -> None:
    """kohya's SGM names and per-module .alpha keys; one module at a lower rank, some at another alpha, so
    diffusers resolves rank_pattern and alpha_pattern: the numbers must still be the ones it loads."""
    from safetensors.torch import load_file, save_file

    path = loras.kohya_lora(published, folder / "kohya")
    same = read(path, targets)
    assert_same(same, loaded(path))
    assert _equal(same, read(published, targets))  # the same numbers as the diffusers-layout file

    tensors = load_file(str(path))
    stem = next(k for k in tensors if k.startswith("lora_unet_middle_block") and k.endswith(".alpha"))[:-6]
    tensors[f"{stem}.lora_down.weight"] = tensors[f"{stem}.lora_down.weight"][:2].contiguous()
    tensors[f"{stem}.lora_up.weight"] = tensors[f"{stem}.lora_up.weight"][:, :2].contiguous()
    for key in [k for k in tensors if k.endswith(".alpha")][::3]:
        tensors[key] = tensors[key] * 0 + 3.0
    mixed = folder / "kohya-mixed" / "kohya.safetensors"
    mixed.parent.mkdir()
    save_file(tensors, str(mixed))
    adapter = read(mixed, targets)
    assert_same(adapter, loaded(mixed))
    assert adapter.rank == 4 and {a.shape[0] for c in adapter.layers.values() for a, _b, _s in c.values()} == {2, 4}
    # diffusers 0.42 names kohya's alphas by the old processor keys ("...processor.to_q_lora.down.weight.alpha"),
    # so its alpha_pattern matches no module: every module gets the most common alpha (2), whatever its own.
    # Mirrored on purpose: the images must match plain diffusers'.
    assert {(a.shape[0], s) for c in adapter.layers.values() for a, _b, s in c.values()} == {(4, 0.5), (2, 1.0)}


def test_rslora_and_bf16_files_read_as_diffusers_loads_them(published: Path, folder: Path, targets: Targets) -> None:
    """rsLoRA (peft's use_rslora in the metadata: alpha / sqrt(r)), an alpha_pattern, and a bf16 file, as
    trainers publish them: float32 numbers equal to what diffusers loads into the float32 base."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(published), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
        metadata = dict(handle.metadata())
    config = json.loads(metadata["lora_adapter_metadata"])
    config["unet.use_rslora"] = True
    config["text_encoder.alpha_pattern"] = {"q_proj": 8}  # peft's per-module alpha, by name pattern
    path = folder / "rslora-bf16" / loras.WEIGHT_NAME
    path.parent.mkdir()
    bf16 = {key: value.to(torch.bfloat16) for key, value in tensors.items()}
    save_file(bf16, str(path), metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})
    adapter = read(path, targets)
    assert_same(adapter, loaded(path))
    assert {a.dtype for a, _b, _s in adapter.layers["unet"].values()} == {torch.bfloat16}  # kept as the file has it
    assert {s for _a, _b, s in adapter.layers["unet"].values()} == {1.0}  # alpha 2 / sqrt(4)
    assert {p.rsplit(".", 1)[1]: s for p, (_a, _b, s) in adapter.layers["text_encoder"].items()} == {
        "q_proj": 2.0,  # alpha 8 / 4
        "k_proj": 0.5,  # alpha 2 / 4
        "v_proj": 0.5,
        "out_proj": 0.5,
    }


def _equal(one: Adapter, other: Adapter) -> bool:
    import torch

    return all(
        torch.equal(a, other.layers[c][m][0]) and torch.equal(b, other.layers[c][m][1]) and s == other.layers[c][m][2]
        for c, modules in one.layers.items()
        for m, (a, b, s) in modules.items()
    ) and {c: set(m) for c, m in one.layers.items()} == {c: set(m) for c, m in other.layers.items()}


# Refusals: each a one-line 400 on the field, whatever the file holds.

INVALID = "is not a valid .safetensors file"
UNREADABLE = "is not a LoRA diffusers can read"
WRONG_BASE = "was made for another model than SDXL (e.g. SD 1.5): "
PICKLE_EVENTS: list[str] = []


def refused(path: Path, targets: Targets) -> str:
    with pytest.raises(InvalidRequest) as caught:
        read(path, targets)
    error = caught.value
    assert error.field == FIELD and error.status == 400
    assert error.message.startswith(f"{FIELD}: {path.name} ") and "\n" not in error.message
    return error.message


def write(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def header(entries: dict[str, Any], data: bytes = b"") -> bytes:
    text = json.dumps(entries).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_files_that_are_not_safetensors_are_refused_before_any_tensor_is_read(
    published: Path, folder: Path, targets: Targets
) -> None:
    import torch

    raw = published.read_bytes()
    good = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    files = {
        "empty": b"",
        "truncated": raw[:-10],
        "bomb": struct.pack("<Q", 2**60) + b"{}",
        "not-json": struct.pack("<Q", 4) + b"\xff\xfe{}",
        "deep": struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000,  # json's recursion limit
        "a-list": header([good]),  # type: ignore[arg-type]
        "no-tensors": header({"__metadata__": {"format": "pt"}}),
        "int8": header({"x.lora_A.weight": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
        "past-the-end": header({"x.lora_A.weight": {**good, "data_offsets": [0, 32]}}, b"\0" * 16),
        "short-for-its-shape": header({"x.lora_A.weight": {**good, "shape": [3, 2]}}, b"\0" * 16),
        "bad-metadata": header({"__metadata__": {"format": 1}, "x": good}, b"\0" * 16),
        "too-many": header({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(10_001)}),
    }
    for name, content in files.items():
        assert INVALID in refused(write(folder / "invalid" / f"{name}.safetensors", content), targets), name
    pickled = folder / "invalid" / "pickle.safetensors"
    torch.save({"unet.x.lora_A.weight": torch.zeros(2, 2)}, pickled)  # a .bin renamed
    assert INVALID in refused(pickled, targets)


def test_reading_never_unpickles(published: Path, folder: Path, targets: Targets, monkeypatch: Any) -> None:
    """torch.load and pickle are never reached, not even for a pickle renamed .safetensors: the names are
    patched to fail, and an audit hook sees every class the C unpickler looks up (torch's weights-only
    unpickler is Python code that raises no audit event: the patch covers it)."""
    import torch

    calls: list[str] = []

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        calls.append("called")  # recorded as well as raised: a caller may swallow the exception
        raise AssertionError("unpickling")

    pickled = folder / "unpickled" / "bin.safetensors"
    pickled.parent.mkdir()
    torch.save({"unet.x.lora_A.weight": torch.zeros(2, 2)}, pickled)
    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    with audited() as events:
        read(published, targets)
        read(loras.kohya_lora(published, folder / "unpickled" / "kohya"), targets)
        with pytest.raises(InvalidRequest):
            read(pickled, targets)
    assert events == [] and calls == []


class audited:
    """Collects the pickle.* audit events (pickle.find_class: every class an unpickler looks up) raised while
    it is entered; hooks cannot be removed, so one hook is added once and switched on and off."""

    hooked = False
    active = False

    @staticmethod
    def hook(event: str, args: tuple[Any, ...]) -> None:
        if audited.active and event.startswith("pickle."):
            PICKLE_EVENTS.append(event)

    def __enter__(self) -> list[str]:
        if not audited.hooked:
            sys.addaudithook(audited.hook)
            audited.hooked = True
        PICKLE_EVENTS.clear()
        audited.active = True
        return PICKLE_EVENTS

    def __exit__(self, *exc: object) -> None:
        audited.active = False


def test_a_safetensors_file_that_is_no_lora_is_refused(folder: Path, targets: Targets) -> None:
    from safetensors.torch import save_file

    from sdxl_server.sources import build_tiny_pipeline

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir()
    save_file(build_tiny_pipeline().unet.state_dict(), str(weights))
    assert UNREADABLE in refused(weights, targets)


def test_an_sd15_lora_is_refused_naming_a_key(folder: Path, targets: Targets) -> None:
    message = refused(loras.sd15_lora(folder / "sd15"), targets)
    assert WRONG_BASE + "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in message


def test_a_module_of_another_width_is_another_base(published: Path, folder: Path, targets: Targets) -> None:
    """SD 2.x: the same module names as SDXL's in places, cross attention reading other widths."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(published))
    key = next(k for k in tensors if k.startswith("unet.mid_block") and "attn2.to_k.lora.down" in k)
    tensors[key] = torch.zeros(4, tensors[key].shape[1] + 8)
    path = folder / "sd2" / "lora.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path))
    assert WRONG_BASE + "unet." + key.removeprefix("unet.").split(".lora")[0] in refused(path, targets)


def test_a_lora_for_another_architecture_is_another_base(folder: Path, targets: Targets) -> None:
    import torch
    from safetensors.torch import save_file

    path = folder / "flux" / "lora.safetensors"
    path.parent.mkdir()
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64)}, str(path))
    assert WRONG_BASE + "transformer.single_transformer_blocks.0.attn.to_q" in refused(path, targets)


def test_a_conv_lora_is_refused_naming_the_kind(folder: Path, targets: Targets) -> None:
    """LoCon: peft adapts the resnets' convolutions too; the slot covers Linear layers only."""
    made = loras.tiny_lora(folder / "locon-made", seed=5, unet_targets=(*loras.UNET_TARGETS, "conv1", "conv2"))
    message = refused(peft_layout(made, folder / "locon" / loras.WEIGHT_NAME), targets)
    assert "targets convolution layers (e.g. unet." in message
    assert "which this server does not adapt: only attention, feed-forward and projection layers" in message
    timed = loras.tiny_lora(folder / "time-made", seed=5, unet_targets=(*loras.UNET_TARGETS, "time_emb_proj"))
    assert "targets time-embedding layers" in refused(peft_layout(timed, folder / "time" / loras.WEIGHT_NAME), targets)


def test_dora_is_refused(published: Path, folder: Path, targets: Targets) -> None:
    """diffusers loads DoRA (peft's lora_magnitude_vector) and applies it otherwise than B @ A; kohya's DoRA
    (dora_scale) diffusers even drops with a warning. Neither is what the slot computes."""
    import torch
    from safetensors.torch import load_file, save_file

    dora = loras.tiny_dora(folder / "dora", seed=6)
    assert "is a DoRA (a magnitude vector per module) adapter" in refused(dora, targets)
    kohya = load_file(str(loras.kohya_lora(published, folder / "kohya-dora-made")))
    for key in [k for k in kohya if k.endswith(".lora_up.weight")]:
        kohya[key.replace(".lora_up.weight", ".dora_scale")] = torch.ones(kohya[key].shape[0], 1)
    path = folder / "kohya-dora" / "lora.safetensors"
    path.parent.mkdir()
    save_file(kohya, str(path))
    assert "DoRA" in refused(path, targets)


def test_files_diffusers_cannot_read_are_refused_without_a_traceback(
    published: Path, everywhere: Path, folder: Path, targets: Targets
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    def saved(name: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
        path = folder / "unreadable" / f"{name}.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
        return path

    # half diffusers' layout, half peft's: diffusers converts by the first key and loads only part of it
    half = {**load_file(str(published)), **load_file(str(everywhere))}
    assert UNREADABLE in refused(saved("half", dict(sorted(half.items()))), targets)
    # kohya names diffusers' converter cannot parse (it raises ValueError)
    bad_block = {"lora_unet_input_blocks_x_1_proj_in.lora_down.weight": torch.zeros(4, 64)}
    assert UNREADABLE in refused(saved("bad-block", bad_block), targets)
    assert UNREADABLE in refused(saved("metadata", load_file(str(published)), {"lora_adapter_metadata": "{"}), targets)
    regex = json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.target_modules": "("})  # peft takes a str as a regex
    assert UNREADABLE in refused(saved("regex", load_file(str(everywhere)), {"lora_adapter_metadata": regex}), targets)
    # peft matches alpha_pattern keys as regexes: one that backtracks exponentially is refused unmatched
    redos = json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": {"(a|a?)+$": 8}})
    assert "module pattern" in refused(
        saved("redos", load_file(str(everywhere)), {"lora_adapter_metadata": redos}), targets
    )
    # metadata saying another rank than the tensors have: peft's load_state_dict fails on the shapes
    ranked = json.dumps({"unet.r": 8, "unet.lora_alpha": 8, "unet.target_modules": ["to_q"]})
    message = refused(saved("ranked", load_file(str(everywhere)), {"lora_adapter_metadata": ranked}), targets)
    assert UNREADABLE in message and "rank 4, its config says 8" in message
    only_a = {k: v for k, v in load_file(str(everywhere)).items() if ".lora_A." in k}
    assert UNREADABLE in refused(saved("only-a", only_a), targets)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_an_adapter_with_weights_that_are_not_finite_is_refused(
    published: Path, folder: Path, targets: Targets, bad: str
) -> None:
    """One NaN in a LoRA makes every image of every request naming it NaN (black): refused when read, naming it."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(published))
    key = next(k for k in tensors if k.startswith("unet.") and "lora.up" in k)
    tensors[key][0, 0] = float(bad)
    path = folder / f"not-finite-{bad}" / loras.WEIGHT_NAME
    path.parent.mkdir()
    save_file(tensors, str(path))
    assert "has weights that are not finite numbers (NaN or infinity)" in refused(path, targets)
