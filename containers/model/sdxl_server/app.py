"""The Starlette app: health and predict routes of the Vertex AI custom-container contract."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sdxl_server import logs
from sdxl_server.encode import encode_base64
from sdxl_server.errors import ClientClosed, NotReady, PayloadTooLarge, RequestTimeout, ServerError
from sdxl_server.generator import Generator
from sdxl_server.runner import Runner
from sdxl_server.schema import SEED_SPACE, parse_request
from sdxl_server.schema import Request as PredictRequest
from sdxl_server.settings import Settings

Loader = Callable[[Settings], Generator]
T = TypeVar("T")


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


def create_app(settings: Settings, *, load: Loader) -> Starlette:
    """An app that answers health at once and loads the pipeline with `load` in the background."""
    state = ModelState(source=settings.model_source)
    runner = Runner(queue_size=settings.queue_size, time_limit_s=settings.time_limit_s)

    async def load_in_background() -> None:
        started = time.monotonic()
        try:
            generator = await asyncio.to_thread(load, settings)
            await asyncio.to_thread(generator.warm_up, _warmup_sizes(settings, generator))
            if generator.compile_cache is not None:
                from sdxl_server.loader import save_compile_cache

                await asyncio.to_thread(save_compile_cache, generator.compile_cache)
        except Exception as exc:
            state.health, state.reason = Health.FAILED, f"{type(exc).__name__}: {exc}"
            logs.log("model failed to load", level=logging.ERROR, source=state.source, reason=state.reason)
            return
        state.generator, state.load_seconds = generator, round(time.monotonic() - started, 2)
        state.health = Health.READY
        logs.log("model ready", source=state.source, load_seconds=state.load_seconds)

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
            if cache is not None:
                body["compile_cache"] = "warm" if cache.warm else "cold"
            if state.generator.fast_sizes is not None:  # compiled; other sizes run uncompiled
                body["compiled_sizes"] = [f"{w}x{h}" for w, h in sorted(state.generator.fast_sizes)]
            return JSONResponse(body)
        if state.health is Health.FAILED:
            body["reason"] = state.reason
        return JSONResponse(body, status_code=503)

    async def predict(request: Request) -> Response:
        request_id = _request_id(request.headers.get("x-request-id"))
        started = time.monotonic()
        fields: dict[str, Any] = {}
        try:
            response = await _predict(request, fields)
        except ServerError as exc:
            response = _error_response(exc)
            fields["error"] = exc.message
        except Exception:
            response = _error_response(ServerError(f"internal error; request id {request_id}"))
            logs.logger.exception("predict failed", extra={"fields": {"request_id": request_id}})
        response.headers["x-request-id"] = request_id
        logs.log(
            "predict",
            request_id=request_id,
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
        body = await _read_body(request, settings.max_request_bytes, settings.body_timeout_s)
        # Off the event loop: a large body takes a while to parse, and health must answer meanwhile.
        parsed = await asyncio.to_thread(
            parse_request,
            body,
            max_images=settings.max_images,
            default_size=generator.native_size,
            draw_seed=lambda: secrets.randbelow(SEED_SPACE),
        )
        fields.update(
            steps=parsed.steps,
            width=parsed.width,
            height=parsed.height,
            images=parsed.num_images,
            format=parsed.output_format,
            steps_run=0,
            **logs.prompt_fields([job.prompt for job in parsed.jobs], include_text=settings.log_prompts),
        )

        def work(should_stop: Callable[[], bool]) -> list[list[Any]]:
            def counted() -> bool:  # the pipeline asks once after each denoising step
                fields["steps_run"] += 1
                return should_stop()

            return generator.generate(parsed, counted)

        queued = time.monotonic()
        images = await _unless_disconnected(request, runner.run(work, cost=parsed.cost))
        generated = time.monotonic()
        payload = await asyncio.to_thread(_render, parsed, images)
        fields.update(
            bytes=len(payload),
            generate_ms=round((generated - queued) * 1000, 1),  # waiting in the queue included
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
    handlers = {HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    # A 307 to the route without its slash helps browsers, not prediction clients: a 404 says what is wrong.
    app.router.redirect_slashes = False
    app.state.model = state
    app.state.runner = runner
    return app


def _request_id(given: str | None) -> str:
    """The caller's request id when it is a sane one (it goes into every log line), else a fresh one."""
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


def _warmup_sizes(settings: Settings, generator: Generator) -> tuple[tuple[int, int], ...]:
    return (generator.native_size,) if settings.warmup is None else settings.warmup


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before it is all read), and with
    408 when it has not all arrived within `timeout_s` (a stalled client holds nothing for longer)."""
    declared = request.headers.get("content-length")
    too_large = PayloadTooLarge(
        f"the request body is over the limit of {limit / 1e6:g} MB (SDXL_MAX_REQUEST_BYTES; "
        "a shared Vertex AI endpoint allows 1.5 MB): send fewer or shorter instances",
        field="body",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s (SDXL_BODY_TIMEOUT)", field="body"
        ) from None
    except ClientDisconnect:
        raise ClientClosed("client closed request: it disconnected before its body arrived") from None
    return b"".join(chunks)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientClosed as soon as the client disconnects (the work is then cancelled:
    a queued request leaves the queue, a running one stops at its next denoising step)."""
    running = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({running, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if running.done():
        return running.result()
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running  # returns once the work has stopped, so the log line counts its steps
    raise ClientClosed("client closed request: it disconnected before its images were ready")


async def _disconnected(request: Request) -> None:
    # The body has been read: the next message uvicorn delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _render(request: PredictRequest, images: list[list[Any]]) -> bytes:
    """The JSON response: one prediction per instance, images base64-encoded."""
    predictions = []
    for job, job_images in zip(request.jobs, images, strict=True):
        encoded = [encode_base64(image, request.output_format, request.quality) for image in job_images]
        prediction: dict[str, Any] = {
            "images": encoded,
            "seeds": list(job.seeds),
            "output_format": request.output_format,
            "width": request.width,
            "height": request.height,
        }
        if job.model_garden:
            prediction["output"] = encoded[0]
        predictions.append(prediction)
    return json.dumps({"predictions": predictions}, separators=(",", ":")).encode()


def _error_response(exc: ServerError) -> JSONResponse:
    return error_json(exc.status, exc.message, field=exc.field, retry_after=exc.retry_after)


def error_json(
    status: int,
    message: str,
    *,
    field: str | None = None,
    retry_after: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The one error shape: {"error": {"code", "message", "field"?}}."""
    error: dict[str, Any] = {"code": status, "message": message}
    if field:
        error["field"] = field
    extra = dict(headers or {})
    if retry_after:
        extra["retry-after"] = str(int(retry_after))
    if status == RequestTimeout.status:
        extra["connection"] = "close"  # the rest of the body may still arrive: it must not read as a request
    return JSONResponse({"error": error}, status_code=status, headers=extra or None)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404 unknown route, 405 wrong method) in the same shape as ours."""
    assert isinstance(exc, HTTPException)
    messages = {
        404: f"no route {request.url.path!r}: POST predictions to the predict route, GET the health route",
        405: f"{request.method} is not allowed on {request.url.path!r}",
    }
    message = messages.get(exc.status_code, str(exc.detail))
    if exc.status_code == 405 and exc.headers and "Allow" in exc.headers:
        message += f" (allowed: {exc.headers['Allow']})"
    return error_json(exc.status_code, message, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    request_id = uuid.uuid4().hex
    logs.logger.error("unhandled error", exc_info=exc, extra={"fields": {"request_id": request_id}})
    return error_json(500, f"internal error; request id {request_id}")
