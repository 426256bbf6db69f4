"""One error hierarchy: each error carries a one-line message, a hint, and its exit code."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What sdxlctl's exit status means."""

    OK = 0
    FAILED = 1
    USAGE = 2  # bad flags, bad config, or a step that is not available
    INTERRUPTED = 130


class SdxlctlError(Exception):
    """A failure the user can act on: shown as one line plus a hint, never as a traceback."""

    exit_code = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(SdxlctlError):
    """sdxlctl.toml or an SDXLCTL_* variable has a value sdxlctl cannot use."""

    exit_code = ExitCode.USAGE


class UsageError(SdxlctlError):
    """A flag or argument is wrong."""

    exit_code = ExitCode.USAGE


class NotAvailable(SdxlctlError):
    """The step exists but not for this target yet; says so instead of pretending to succeed."""

    exit_code = ExitCode.USAGE


class DeployError(SdxlctlError):
    """Starting, finding or stopping a deployment failed."""


class PredictError(SdxlctlError):
    """The model server refused or failed a prediction."""
