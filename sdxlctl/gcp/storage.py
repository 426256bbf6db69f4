"""Cloud Storage: the staging bucket for build sources, logs and the compile cache, and who may use it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdxlctl.gcp.errors import translated
from sdxlctl.gcp.session import Cloud

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence


HEAD_CHARS = 4096  # what is kept of a line over the limit: enough to find its key


@dataclass(frozen=True)
class LongLine:
    """A line over `Storage.lines`' limit, never held whole: its first HEAD_CHARS characters and its length."""

    head: str
    chars: int


class Storage:
    """Objects in one bucket (created, labelled, when missing)."""

    def __init__(self, cloud: Cloud, bucket: str, labels: dict[str, str]) -> None:
        from google.cloud import storage

        self.cloud, self.bucket_name, self.labels = cloud, bucket.removeprefix("gs://").strip("/"), labels
        # STORAGE_EMULATOR_HOST, when set, points the library at a GCS emulator.
        self.client: Any = storage.Client(project=cloud.project, credentials=cloud.credentials())

    def ensure_bucket(self) -> None:
        """The bucket, created when missing with IAM as its only access control (uniform bucket-level access,
        which IAM conditions need) and never public."""
        from google.api_core.exceptions import NotFound

        with translated(f"bucket gs://{self.bucket_name}", api="storage", project=self.cloud.project):
            try:
                self.client.get_bucket(self.bucket_name)
            except NotFound:
                bucket = self.client.bucket(self.bucket_name)
                bucket.labels = self.labels
                bucket.iam_configuration.uniform_bucket_level_access_enabled = True
                bucket.iam_configuration.public_access_prevention = "enforced"
                self.client.create_bucket(bucket, location=self.cloud.region)

    def uniform_access(self) -> bool:
        """Whether only IAM decides who may use the bucket's objects (no object ACLs): conditions need it."""
        with translated(f"bucket gs://{self.bucket_name}", api="storage", project=self.cloud.project):
            bucket = self.client.get_bucket(self.bucket_name)
        return bool(bucket.iam_configuration.uniform_bucket_level_access_enabled)

    def upload(self, name: str, data: bytes, content_type: str = "application/gzip") -> str:
        with translated(f"upload gs://{self.bucket_name}/{name}", api="storage", project=self.cloud.project):
            self.client.bucket(self.bucket_name).blob(name).upload_from_string(data, content_type=content_type)
        return f"gs://{self.bucket_name}/{name}"

    def upload_new(self, name: str, path: Path, *, sent: Callable[[int], None] = lambda _: None) -> bool:
        """`path` as object `name` unless one of that name exists (ifGenerationMatch=0, so two pushes at once
        cannot both write); False when it was there. `sent(bytes so far)` as the upload goes."""
        from google.api_core.exceptions import PreconditionFailed

        where = f"upload gs://{self.bucket_name}/{name}"
        with translated(where, api="storage", project=self.cloud.project):
            blob = self.client.bucket(self.bucket_name).blob(name, chunk_size=UPLOAD_CHUNK_BYTES)
            if blob.exists():  # a metadata read: a large file is not sent again only to be refused
                return False
            size = path.stat().st_size
            try:
                with path.open("rb") as file:
                    blob.upload_from_file(
                        _Counting(file, sent),
                        size=size,
                        content_type="application/octet-stream",
                        if_generation_match=0,
                        checksum="crc32c",  # GCS verifies the bytes it stored
                    )
            except PreconditionFailed:
                return False
        return True

    def read_from(self, name: str, offset: int) -> bytes:
        """Bytes of `name` from `offset` on; b"" when it does not exist yet or has nothing new."""
        from google.api_core.exceptions import NotFound, RequestRangeNotSatisfiable

        try:
            data = self.client.bucket(self.bucket_name).blob(name).download_as_bytes(start=offset or None)
        except (NotFound, RequestRangeNotSatisfiable):
            return b""
        return bytes(data)

    def sizes(self, prefix: str) -> dict[str, int]:
        """name -> size of every object under `prefix` (all of them, whatever their names), in name order."""
        with translated(f"list gs://{self.bucket_name}/{prefix}", api="storage", project=self.cloud.project):
            return {blob.name: int(blob.size or 0) for blob in self.client.list_blobs(self.bucket_name, prefix=prefix)}

    def read(self, name: str) -> bytes | None:
        """The object's bytes; None when there is none of that name."""
        from google.api_core.exceptions import NotFound

        with translated(f"read gs://{self.bucket_name}/{name}", api="storage", project=self.cloud.project):
            try:
                return bytes(self.client.bucket(self.bucket_name).blob(name).download_as_bytes())
            except NotFound:
                return None

    def lines(self, name: str, *, limit: int = 0) -> Iterator[str | LongLine]:
        """The object's text, a line at a time (streamed in chunks: a job's output file may be gigabytes).
        With `limit`, a line of more characters comes as a LongLine, read past in pieces of `limit`, never
        held whole (one 500 MB line would otherwise be read, then parsed and decoded, at several times that)."""
        with translated(f"read gs://{self.bucket_name}/{name}", api="storage", project=self.cloud.project):
            blob = self.client.bucket(self.bucket_name).blob(name)
            with blob.open("rt", encoding="utf-8", errors="replace") as file:
                while True:
                    text = file.readline(limit + 1) if limit else file.readline()
                    if not text:
                        return
                    if limit and len(text) > limit and not text.endswith("\n"):
                        head, chars = text[:HEAD_CHARS], len(text)
                        while text and not text.endswith("\n"):
                            text = file.readline(limit)
                            chars += len(text)
                        yield LongLine(head, chars - text.endswith("\n"))
                        continue
                    yield text.rstrip("\r\n")

    def grant(self, member: str, roles: Mapping[str, Sequence[str]]) -> bool:
        """Give `member` each role of `roles` on exactly its folders: one binding per folder, which holds for
        the objects under it ("": the whole bucket; a name not ending in '/': that object alone); no folder
        takes the role away. Roles not named are left
        as they are. True when the policy changed.

        One binding per folder, not one condition of many terms: IAM allows 12 logical operators in a condition.
        A folder is an IAM condition, which needs uniform bucket-level access (`uniform_access`).
        """
        wanted: dict[tuple[str, str | None], dict[str, str] | None] = {}
        for role, folders in roles.items():
            for folder in folders:
                condition = _condition(self.bucket_name, folder) if folder.strip("/") else None
                wanted[(role, condition["expression"] if condition else None)] = condition
        doing = f"grant {', '.join(roles)} on gs://{self.bucket_name}"
        with translated(doing, api="storage", project=self.cloud.project):
            bucket = self.client.bucket(self.bucket_name)
            policy = bucket.get_iam_policy(requested_policy_version=3)
            kept, present, changed = [], set(), False
            for binding in policy.bindings:
                if binding["role"] in roles and member in binding["members"]:
                    key = (binding["role"], (binding.get("condition") or {}).get("expression"))
                    if key in wanted and key not in present:
                        present.add(key)
                    else:  # the role more widely (an earlier sdxlctl), on a folder no longer wanted, or twice
                        binding = {**binding, "members": set(binding["members"]) - {member}}
                        changed = True
                if binding["members"]:
                    kept.append(binding)
            for (role, expression), condition in wanted.items():
                if (role, expression) not in present:
                    kept.append({"role": role, "members": {member}, **({"condition": condition} if condition else {})})
                    changed = True
            if not changed:
                return False
            policy.bindings = kept
            if any(binding.get("condition") for binding in kept):
                policy.version = 3  # conditions are refused in an older policy version
            bucket.set_iam_policy(policy)
        return True

    def revoke(self, member: str) -> bool:
        """Take every role of `member` on the bucket away; True when it had any."""
        from google.api_core.exceptions import NotFound

        with translated(f"revoke {member} on gs://{self.bucket_name}", api="storage", project=self.cloud.project):
            bucket = self.client.bucket(self.bucket_name)
            try:
                policy = bucket.get_iam_policy(requested_policy_version=3)
            except NotFound:
                return False
            kept, had = [], False
            for binding in policy.bindings:
                members = set(binding["members"])
                had = had or member in members
                members.discard(member)
                if members:
                    kept.append({**binding, "members": members})
            if not had:
                return False
            policy.bindings = kept
            bucket.set_iam_policy(policy)
        return True

    def delete_folder(self, prefix: str) -> int:
        """Delete every object under `prefix`/; how many there were."""
        with translated(f"delete gs://{self.bucket_name}/{prefix}", api="storage", project=self.cloud.project):
            blobs = list(self.client.list_blobs(self.bucket_name, prefix=prefix.strip("/") + "/"))
            for blob in blobs:
                blob.delete()
        return len(blobs)


UPLOAD_CHUNK_BYTES = 8 * 1024 * 1024  # resumable chunks (a multiple of 256 KiB): progress, and a retry resends one


class _Counting:
    """A file whose reads are counted and told (the library reads it chunk by chunk)."""

    def __init__(self, file: Any, sent: Callable[[int], None]) -> None:
        self.file, self.sent, self.done = file, sent, 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.file.read(size)
        self.done += len(data)
        self.sent(self.done)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:  # the library rewinds to resend a failed chunk
        self.done = self.file.seek(offset, whence)
        return self.done

    def __getattr__(self, name: str) -> Any:  # tell, and whatever else the library asks of a file
        return getattr(self.file, name)


def _condition(bucket: str, target: str) -> dict[str, str]:
    """A folder's condition, or (a name not ending in '/') one object's."""
    return prefix_condition(bucket, target) if target.endswith("/") else object_condition(bucket, target)


def object_condition(bucket: str, name: str) -> dict[str, str]:
    """An IAM condition that holds for one object (its metadata and bytes), nothing else: no listing."""
    return {
        "title": f"only {name}"[:100],
        "description": f"sdxlctl: the object gs://{bucket}/{name}"[:256],
        "expression": f'resource.name == "projects/_/buckets/{bucket}/objects/{name}"',
    }


def prefix_condition(bucket: str, prefix: str) -> dict[str, str]:
    """An IAM condition that holds for the objects under `prefix`/ and for listing them, nothing else.

    Listing is checked against the bucket, not an object, so a condition on object names alone would deny
    it: the list request's own prefix (the objectListPrefix API attribute) must start with the folder too.
    """
    folder = prefix.strip("/") + "/"
    return {
        "title": f"only {folder}"[:100],
        "description": f"sdxlctl: objects under gs://{bucket}/{folder} and listing them",
        "expression": (
            f'resource.name.startsWith("projects/_/buckets/{bucket}/objects/{folder}") || '
            f'api.getAttribute("storage.googleapis.com/objectListPrefix", "").startsWith("{folder}")'
        ),
    }
