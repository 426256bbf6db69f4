"""Two rules of Cloud Storage's bucket IAM that gcp-storage-emulator leaves out, added to its handlers.

- A bucket created with metadata keeps it (labels, iamConfiguration.uniformBucketLevelAccess, ...): the
  emulator's insert drops everything but the name, so a bucket created with uniform access would read back
  without it.
- "To use conditions in the allow policy for a Cloud Storage bucket, you must enable uniform bucket-level
  access on the bucket", and a policy with conditions must be version 3: anything else is a 400.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

_installed = False


def install() -> None:
    """Wrap the emulator's bucket insert and setIamPolicy handlers (once per process)."""
    global _installed
    if _installed:
        return
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import buckets

    replacements = {buckets.insert: _insert, buckets.set_iam_policy: _set_iam_policy}
    for _pattern, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler in replacements:
                methods[method] = replacements[handler]
    _installed = True


def _insert(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
    from gcp_storage_emulator.handlers import buckets

    existed = request.data.get("name") in storage.buckets
    buckets.insert(request, response, storage, *args, **kwargs)
    name = request.data.get("name")
    if existed or response.status != HTTPStatus.OK or name not in storage.buckets:
        return
    bucket = storage.buckets[name]
    for key in buckets._WRITABLE_BUCKET_FIELDS:
        if request.data.get(key) is not None and key not in ("acl", "defaultObjectAcl"):
            bucket[key] = request.data[key]
    configuration = bucket.setdefault("iamConfiguration", {})
    uniform = configuration.setdefault("uniformBucketLevelAccess", {"enabled": False})
    configuration["bucketPolicyOnly"] = dict(uniform)  # the old name of the same switch, as GCS answers it
    storage.create_bucket(name, bucket)
    response.json(bucket)


def _set_iam_policy(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
    from gcp_storage_emulator.handlers import buckets

    name = request.params.get("bucket_name")
    body = request.data if isinstance(request.data, dict) else {}
    if name in storage.buckets and any(b.get("condition") for b in body.get("bindings") or []):
        uniform = storage.buckets[name].get("iamConfiguration", {}).get("uniformBucketLevelAccess", {})
        message = ""
        if not uniform.get("enabled"):
            message = "Cannot set IAM conditions on a bucket without uniform bucket-level access enabled."
        elif int(body.get("version") or 1) < 3:
            message = "IAM policies with conditions must be version 3 or higher."
        if message:
            response.status = HTTPStatus.BAD_REQUEST
            response.json({"error": {"code": 400, "message": message, "errors": [{"message": message}]}})
            return
    buckets.set_iam_policy(request, response, storage, *args, **kwargs)
