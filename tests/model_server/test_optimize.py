"""The fast path on a CPU with the tiny model: same images (within fp noise), a cache that makes restarts fast."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl_server import optimize
from sdxl_server.errors import SettingsError
from sdxl_server.generator import Generator
from sdxl_server.schema import Job, Request
from sdxl_server.settings import Settings
from sdxl_server.sources import build_tiny_pipeline
from tests.servers import server_process

FX_GRAPH_CACHE = "torch._inductor.codecache"  # logs "fx graph cache hit|miss for key ..."
AOT_AUTOGRAD_CACHE = "torch._functorch._aot_autograd.autograd_cache"  # "AOTAutograd cache hit|miss ..."
pytestmark = pytest.mark.usefixtures("fresh_compiler")  # each test counts what it compiles itself
TOLERANCE = 2  # of 255: fused projections and compiled kernels round differently, nothing more


def image(pipe, seed: int = 5) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():  # as the server runs it (compiled code is specialised to the mode too)
        result = pipe(
            "a lighthouse",
            num_inference_steps=3,
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
    return np.asarray(result).astype(int)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return image(build_tiny_pipeline())


def test_eager_matches_none(reference: np.ndarray) -> None:
    pipe = build_tiny_pipeline()
    optimize.apply(pipe, "eager")
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(image(pipe) - reference).max() <= TOLERANCE
    optimize.apply(pipe, "eager")  # idempotent: applying again changes nothing
    assert np.abs(image(pipe) - reference).max() <= TOLERANCE


def test_compile_matches_none_and_writes_a_portable_cache(reference: np.ndarray, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    cache = optimize.use_cache(tmp_path)
    assert not cache.warm
    pipe = build_tiny_pipeline()
    optimize.apply(pipe, "compile")
    compiled = {type(m).__name__ for m in pipe.unet.modules() if getattr(m, "_compiled_call_impl", None)}
    assert compiled == set(optimize.BLOCKS)
    counters.clear()
    # Compiled in another thread than it runs in, as the server does: the compiler's settings
    # (thread-local in torch) travel with each call.
    with ThreadPoolExecutor(1) as thread:
        assert np.abs(thread.submit(image, pipe).result() - reference).max() <= TOLERANCE
    assert not counters["graph_break"], dict(counters["graph_break"])  # each block is one graph
    assert counters["stats"]["unique_graphs"] > len(optimize.BLOCKS)  # static shapes: one per block shape
    assert np.abs(image(pipe, seed=6) - image(build_tiny_pipeline(), seed=6)).max() <= TOLERANCE
    # A request for two images runs them one at a time: nothing new to compile, the same images.
    graphs = counters["stats"]["unique_graphs"]
    job = Job("a lighthouse", None, None, None, (5, 6), model_garden=False)
    request = Request((job,), steps=3, guidance_scale=5.0, width=64, height=64, output_format="png", quality=90)
    (images,) = Generator(pipe, optimize_level="compile").generate(request)
    assert counters["stats"]["unique_graphs"] == graphs
    assert [np.asarray(i).astype(int).tolist() for i in images] == [image(pipe, s).tolist() for s in (5, 6)]
    assert optimize.save_cache(cache)  # the keys of what it holds
    assert (tmp_path / optimize.ARTIFACTS).stat().st_size > 0


def test_after_warm_up_a_size_not_warmed_up_runs_uncompiled(caplog: pytest.LogCaptureFixture) -> None:
    """Compiling a new size takes a minute or more on a GPU: mid-request it would hold the queue past a
    shared endpoint's 60 s. After warm-up a new size runs as `eager` would, and the log says what to do."""
    from torch._dynamo.utils import counters

    pipe = build_tiny_pipeline()
    optimize.apply(pipe, "compile")
    generator = Generator(pipe, optimize_level="compile")
    generator.warm_up(())  # SDXL_WARMUP=none: sizes compile when first asked for
    assert generator.fast_sizes is None and not pipe.vae.decoder.forward.frozen
    generator.warm_up(((64, 64),))
    assert generator.fast_sizes == {(64, 64)}
    job = Job("a lighthouse", None, None, None, (5,), model_garden=False)
    new_size = Request((job,), steps=3, guidance_scale=5.0, width=128, height=64, output_format="png", quality=90)
    counters.clear()
    (images,) = generator.generate(new_size)
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])  # nothing compiled
    (plain,) = Generator(build_tiny_pipeline()).generate(new_size)
    assert np.abs(np.asarray(images[0]).astype(int) - np.asarray(plain[0]).astype(int)).max() <= TOLERANCE
    (told,) = [r for r in caplog.records if r.getMessage().startswith("size not warmed up")]
    fields = told.__dict__["fields"]  # what logs.log attaches
    assert fields["size"] == "128x64" and "SDXL_WARMUP" in fields["hint"]


def test_cuda_graphs_stand_aside_off_a_gpu(reference: np.ndarray) -> None:
    """On a CPU the UNet runs as it is (on a GPU the benchmark checks the graphs' images)."""
    pipe = build_tiny_pipeline()
    graphed = optimize.GraphedForward(pipe.unet.forward)
    pipe.unet.forward = graphed
    assert np.abs(image(pipe) - reference).max() == 0
    assert graphed.graphs == {} and graphed.broken == ""
    cpu = build_tiny_pipeline()
    optimize.apply(cpu, optimize.Plan(fuse=True, cuda_graphs=True))
    assert not isinstance(cpu.unet.forward, optimize.GraphedForward)


def test_auto_means_compile_on_a_gpu_and_none_on_a_cpu() -> None:
    assert optimize.resolve("auto", "cuda") == "compile"
    assert optimize.resolve("auto", "cpu") == "none"
    assert optimize.resolve("max", "cpu") == "max"
    assert Settings.from_env({"SDXL_OPTIMIZE": "MAX"}).optimize == "max"
    with pytest.raises(SettingsError, match="SDXL_OPTIMIZE"):
        Settings.from_env({"SDXL_OPTIMIZE": "turbo"})
    with pytest.raises(ValueError, match="SDXL_OPTIMIZE"):
        optimize.apply(build_tiny_pipeline(), "turbo")


@pytest.mark.timeout(900)  # two starts that compile or load; on a loaded 2-core machine minutes each
def test_a_gs_compile_cache_is_filled_by_the_first_start_and_warms_every_later_one(gcs: str, tmp_path: Path) -> None:
    """A deployment's first replica compiles and publishes; the next one (another machine: nothing on
    its disk) downloads the artifacts and compiles nothing. A missing gs:// cache is a cold one, not an error.

    What the cache does is asserted (downloaded, loaded, no graph compiled); how much faster that starts
    is bench/'s to measure: on a loaded machine a warm start can take longer than a cold one.
    """
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs})
    bucket = bucket.create_bucket("compile-cache")
    env = {
        "SDXL_MODEL": "tiny",
        "SDXL_OPTIMIZE": "compile",
        "SDXL_COMPILE_CACHE": "gs://compile-cache/sdxl",
        "SDXL_WARMUP": "64x64",
        "STORAGE_EMULATOR_HOST": gcs,
        # torch's own account of each graph: compiled (a cache miss) or taken from the cache (a hit)
        "TORCH_LOGS": f"{FX_GRAPH_CACHE},{AOT_AUTOGRAD_CACHE}",
    }
    compiled, reused = {}, {}
    for run in ("cold", "warm"):
        (tmp_path / run).mkdir()
        with server_process(env, tmp_path / run) as server:
            health = server.wait_until("ready", timeout=420)  # a hang guard, not a speed check
            assert health.json()["optimize"] == "compile"
            assert health.json()["compile_cache"] == run
            assert health.json()["compiled_sizes"] == ["64x64"]  # SDXL_WARMUP; any other size runs uncompiled
            answer = server.predict(
                {
                    "instances": [{"prompt": "a fox", "seed": 1}],
                    "parameters": {"num_inference_steps": 2, "width": 64, "height": 64},
                }
            )
            log = server.log()
            assert answer.status_code == 200, (run, answer.text, log[-4000:])
            published = "compile cache published" in log
            assert published == (run == "cold"), log  # the warm start found nothing new to publish
        compiled[run] = log.count("fx graph cache miss")
        reused[run] = log.count("fx graph cache hit") + log.count("AOTAutograd cache hit")
        assert bucket.blob(f"sdxl/{optimize.cache_key('cpu')}/{optimize.ARTIFACTS}").exists()
    downloaded = list((tmp_path / "warm" / "cache" / "gcs").rglob(optimize.ARTIFACTS))
    assert len(downloaded) == 1 and downloaded[0].stat().st_size > 0  # on the warm start's own disk
    assert compiled["cold"] > 0 and reused["cold"] == 0, (compiled, reused)
    assert compiled["warm"] == 0 and reused["warm"] > 0, (compiled, reused)  # every graph from the artifacts
