"""One error hierarchy; each error knows its HTTP status, so the app maps them in one place."""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the server reports to a client."""

    status = 500

    def __init__(self, message: str, *, field: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after


class SettingsError(ServerError):
    """An environment variable has a value the server cannot use."""


class InvalidRequest(ServerError):
    """Malformed or out-of-range input; `field` names where, the message what is allowed."""

    status = 400


class Forbidden(ServerError):
    """The request names something this server's operator did not allow (a LoRA source outside
    SDXL_LORA_SOURCES, or LoRA on a server without it); the message names the setting, never its value."""

    status = 403


class RequestTimeout(ServerError):
    """The client did not send its request (headers or body) within the time allowed."""

    status = 408


class PayloadTooLarge(ServerError):
    """Request or response over the byte limit of the endpoint."""

    status = 413


class QueueFull(ServerError):
    """More requests waiting than the queue holds; the client should retry after `retry_after` s."""

    status = 429


class ClientClosed(ServerError):
    """The client went away before its answer was ready; nobody receives the status (nginx logs 499)."""

    status = 499


class FetchFailed(ServerError):
    """Fetching something the request named failed, and not through the client's fault (storage 5xx or
    timeouts after a retry, the server's own account denied): the message says what failed and what fixes it."""

    status = 502


class NotReady(ServerError):
    """The pipeline is still loading, or failed to load."""

    status = 503


class TimeLimitExceeded(ServerError):
    """Generation would not finish within the per-request time limit."""

    status = 504


class ModelLoadError(Exception):
    """The model source could not be turned into a pipeline; the message says why and what to do."""
