"""The Starlette app: health and predict routes of the Vertex AI custom-container contract."""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sdxl_server import logs
from sdxl_server.connection import read_body, request_id, unless_disconnected
from sdxl_server.errors import NotReady, PayloadTooLarge, ServerError, TimeLimitExceeded
from sdxl_server.generator import Generator
from sdxl_server.lora.service import Loras, Resolved, labels
from sdxl_server.modes import MODES
from sdxl_server.responses import error_response, http_error, internal_error, render
from sdxl_server.runner import Runner
from sdxl_server.schedulers import SCHEDULERS
from sdxl_server.schema import SEED_SPACE, parse_request
from sdxl_server.settings import Settings

Loader = Callable[[Settings], Generator]


class Health(enum.Enum):
    """Where the server is in its life; only READY serves predictions."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ModelState:
    """The pipeline and how it got there, shared by the routes."""

    health: Health = Health.LOADING
    generator: Generator | None = None
    reason: str = ""
    source: str = ""
    load_seconds: float = 0.0
    loras: Loras | None = None  # with the generator: what requests may name (LoRA off: every ref refused)


def create_app(settings: Settings, *, load: Loader) -> Starlette:
    """An app that answers health at once and loads the pipeline with `load` in the background."""
    state = ModelState(source=settings.model_source)
    runner = Runner(queue_size=settings.queue_size, time_limit_s=settings.time_limit_s)

    async def load_in_background() -> None:
        started = time.monotonic()
        try:
            generator = await asyncio.to_thread(load, settings)
            # Before warm-up, so that a preloaded adapter that cannot be used fails the start (health
            # names SDXL_LORAS and the adapter) instead of every request that names it.
            loras = Loras.from_settings(settings, generator.slots)
            await asyncio.to_thread(loras.preload)
            warming = time.monotonic()
            await asyncio.to_thread(generator.warm_up, _warmup_sizes(settings, generator))
            warmup_s = round(time.monotonic() - warming, 3)
            if generator.compile_cache is not None:
                from sdxl_server.loader import save_compile_cache

                await asyncio.to_thread(save_compile_cache, generator.compile_cache)
        except Exception as exc:
            state.health, state.reason = Health.FAILED, f"{type(exc).__name__}: {exc}"
            logs.log("model failed to load", level=logging.ERROR, source=state.source, reason=state.reason)
            return
        state.generator, state.loras = generator, loras
        state.load_seconds = round(time.monotonic() - started, 2)
        state.health = Health.READY
        # With "model loaded" (import_s, fetch_s, load_s, move_s) before it: the whole start, phase by phase.
        logs.log(
            "model ready",
            source=state.source,
            load_seconds=state.load_seconds,
            warmup_s=warmup_s,
            total_s=round(time.monotonic() - started, 3),
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Not awaited: uvicorn opens the port only after startup, and Vertex AI's liveness probe
        # restarts a container whose port stays closed while minutes of weights load.
        loading = asyncio.get_running_loop().create_task(load_in_background())
        yield
        loading.cancel()
        await runner.close()

    async def health(request: Request) -> Response:
        body: dict[str, Any] = {"status": state.health.value}
        if state.health is Health.READY and state.generator is not None:
            cache = state.generator.compile_cache
            body.update(
                model=state.source,
                load_seconds=state.load_seconds,
                queue=runner.pending,
                optimize=state.generator.optimize_level,
            )
            if state.generator.refiner is not None:
                body["refiner"] = state.generator.refiner_source
            # What a request may ask for: clients (sdxlctl predict, the UI) read it instead of guessing.
            body.update(modes=list(MODES), schedulers=list(SCHEDULERS), refine=list(state.generator.refines))
            if cache is not None:
                body["compile_cache"] = "warm" if cache.warm else "cold"
            if state.generator.fast_sizes is not None:  # compiled; other sizes run uncompiled
                body["compiled_sizes"] = [f"{w}x{h}" for w, h in sorted(state.generator.fast_sizes)]
                body["compiled_modes"] = list(state.generator.compiled_modes)
            lora = state.loras.health() if state.loras is not None else None
            if lora is not None:  # only where LoRA is on: a server without it answers as before
                body["lora"] = lora
            return JSONResponse(body)
        if state.health is Health.FAILED:
            body["reason"] = state.reason
        return JSONResponse(body, status_code=503)

    async def predict(request: Request) -> Response:
        rid = request_id(request.headers.get("x-request-id"))
        started = time.monotonic()
        fields: dict[str, Any] = {}
        try:
            response = await _predict(request, fields)
        except ServerError as exc:
            response = error_response(exc)
            fields["error"] = exc.message
        except Exception:
            response = error_response(ServerError(f"internal error; request id {rid}"))
            logs.logger.exception("predict failed", extra={"fields": {"request_id": rid}})
        response.headers["x-request-id"] = rid
        logs.log(
            "predict",
            request_id=rid,
            status=response.status_code,
            latency_ms=round((time.monotonic() - started) * 1000, 1),
            **fields,
        )
        return response

    async def _predict(request: Request, fields: dict[str, Any]) -> Response:
        if state.health is not Health.READY or state.generator is None:
            detail = f" ({state.reason})" if state.health is Health.FAILED else "; retry shortly"
            raise NotReady(f"the model is {state.health.value}{detail}", retry_after=10)
        generator = state.generator
        body = await read_body(request, settings.max_request_bytes, settings.body_timeout_s)
        # Off the event loop: a large body takes a while to parse, and health must answer meanwhile.
        parsed = await asyncio.to_thread(
            parse_request,
            body,
            max_images=settings.max_images,
            default_size=generator.native_size,
            draw_seed=lambda: secrets.randbelow(SEED_SPACE),
            refiner=generator.refiner is not None,
        )
        fields.update(
            steps=parsed.steps,
            width=parsed.width,
            height=parsed.height,
            images=parsed.num_images,
            format=parsed.output_format,
            mode=parsed.mode,
            scheduler=parsed.scheduler or "default",
            refine=parsed.refine,
            steps_run=0,
            **logs.prompt_fields([job.prompt for job in parsed.jobs], include_text=settings.log_prompts),
        )

        if parsed.loras:
            fields["loras"] = labels(parsed.loras)

        def work_with(adapters: Resolved) -> Callable[[Callable[[], bool]], list[list[Any]]]:
            def work(should_stop: Callable[[], bool]) -> list[list[Any]]:
                def counted() -> bool:  # the pipeline asks once after each denoising step
                    fields["steps_run"] += 1
                    return should_stop()

                return generator.generate(parsed, counted, adapters)  # none: a LoRA slot is zeroed for it

            return work

        async def adapters_then_images() -> list[list[Any]]:
            # Adapters are fetched before the request queues, so a download never holds the GPU; the time
            # limit covers the whole request, fetching included, as it would a slow generation.
            resolving = time.monotonic()
            try:
                async with asyncio.timeout(settings.time_limit_s) as limit:
                    loras = state.loras or Loras(slots=None)
                    adapters = await loras.resolve(parsed.loras)
                    fields["lora_ms"] = round((time.monotonic() - resolving) * 1000, 1)
                    return await runner.run(work_with(adapters), cost=parsed.cost)
            except TimeoutError:
                if not limit.expired():
                    raise
                fetching = "lora_ms" not in fields
                raise TimeLimitExceeded(
                    f"not finished within the time limit of {settings.time_limit_s:g} s (SDXL_TIME_LIMIT)"
                    + (
                        " while fetching its LoRA adapters: the download goes on, retry shortly"
                        if fetching
                        else "; use fewer steps, a smaller size or fewer images, or a dedicated endpoint with a "
                        "longer limit"
                    )
                ) from None

        queued = time.monotonic()
        if parsed.loras:
            images = await unless_disconnected(request, adapters_then_images())
        else:
            images = await unless_disconnected(request, runner.run(work_with(()), cost=parsed.cost))
        generated = time.monotonic()
        payload = await asyncio.to_thread(render, parsed, images)
        fields.update(
            bytes=len(payload),
            generate_ms=round((generated - queued) * 1000, 1),  # waiting in the queue (and for adapters) included
            encode_ms=round((time.monotonic() - generated) * 1000, 1),
        )
        if len(payload) > settings.max_response_bytes:
            raise PayloadTooLarge(
                f"the response would be {len(payload) / 1e6:.2f} MB, over the limit of "
                f"{settings.max_response_bytes / 1e6:g} MB (a shared Vertex AI endpoint allows 1.5 MB): "
                "use output_format jpeg or webp, a lower quality, fewer images, or a dedicated endpoint "
                "(10 MB; raise SDXL_MAX_RESPONSE_BYTES)",
                field="parameters.output_format",
            )
        timing = f"generate;dur={fields['generate_ms']}, encode;dur={fields['encode_ms']}"
        return Response(payload, media_type="application/json", headers={"server-timing": timing})

    routes = [
        Route(settings.health_route, health, methods=["GET"]),
        Route(settings.predict_route, predict, methods=["POST"]),
    ]
    handlers = {HTTPException: http_error, Exception: internal_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    # A 307 to the route without its slash helps browsers, not prediction clients: a 404 says what is wrong.
    app.router.redirect_slashes = False
    app.state.model = state
    app.state.runner = runner
    return app


def _warmup_sizes(settings: Settings, generator: Generator) -> tuple[tuple[int, int], ...]:
    return (generator.native_size,) if settings.warmup is None else settings.warmup
