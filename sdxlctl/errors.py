"""One error hierarchy: each error carries a one-line message, a hint, and its exit code."""

from __future__ import annotations

import enum
import errno


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


class Interrupted(SdxlctlError):
    """Ctrl-C: the message says what was interrupted and what still runs or is recorded."""

    exit_code = ExitCode.INTERRUPTED


OS_HINTS = {
    errno.EACCES: "check the permissions of that path, or use a folder you may write",
    errno.EPERM: "check the permissions (and attributes) of that path, or use a folder you may write",
    errno.EROFS: "the file system is read-only: use a folder you may write",
    errno.ENOSPC: "free some disk space and run the command again",
    errno.EDQUOT: "your disk quota is used up: free some space and run the command again",
    errno.EFBIG: "the file grew past a size limit (ulimit -f or the file system's)",
    errno.ENOTDIR: "a part of that path is a file, not a folder: move it aside or choose another path",
    errno.EEXIST: "something of that name is in the way: move it aside or choose another path",
    errno.EISDIR: "that path is a folder: name a file",
    errno.ENOENT: "that path does not exist",
}


def from_os_error(exc: OSError) -> SdxlctlError:
    """An OS error nobody caught closer to its cause, as one line naming the path, with a hint."""
    where = f"{exc.filename}: " if exc.filename else ""
    hint = OS_HINTS.get(exc.errno or 0, "fix the cause and run the command again")
    return SdxlctlError(f"{where}{exc.strerror or exc}", hint=hint)
