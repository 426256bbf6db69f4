"""Responses: predictions as JSON, and the one error shape for every error the app answers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sdxl_server import logs
from sdxl_server.encode import encode_base64
from sdxl_server.errors import RequestTimeout, ServerError
from sdxl_server.schema import Request as PredictRequest


def render(request: PredictRequest, images: list[list[Any]]) -> bytes:
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


def error_response(exc: ServerError) -> JSONResponse:
    """A ServerError as the client sees it."""
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


async def http_error(request: Request, exc: Exception) -> Response:
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


async def internal_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected outside predict (which has its own): a 500 with a request id, details in the log."""
    request_id = uuid.uuid4().hex
    logs.logger.error("unhandled error", exc_info=exc, extra={"fields": {"request_id": request_id}})
    return error_json(500, f"internal error; request id {request_id}")
