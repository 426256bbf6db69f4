"""Object names as Cloud Storage keeps them, which gcp-storage-emulator does not.

Cloud Storage takes any UTF-8 name but "." and "..": `sdxl/../../x`, `a//b` and `a\\b` are three distinct,
valid objects. The emulator keeps an object's bytes at a path made from its name, so it refuses names with
`..` segments (a 500 the client retries for minutes) and folds `a//b` and `a\\b` onto `a/b`. Here the bytes
are kept under the percent-encoded name instead: one flat key per object, distinct for distinct names.
"""

from __future__ import annotations

from urllib.parse import quote

_installed = False


def install() -> None:
    """Key the emulator's stored bytes by the exact object name (once per process, before any upload)."""
    global _installed
    if _installed:
        return
    from gcp_storage_emulator.storage import Storage

    def _object_path(self: Storage, bucket_name: str, file_name: str) -> str:
        return f"{bucket_name}/{quote(file_name, safe='')}"

    Storage._object_path = _object_path
    _installed = True
