"""Cloud Storage: the staging bucket for build sources and logs."""

from __future__ import annotations

from typing import Any

from sdxlctl.gcp.errors import translated
from sdxlctl.gcp.session import Cloud


class Storage:
    """Objects in one bucket (created, labelled, when missing)."""

    def __init__(self, cloud: Cloud, bucket: str, labels: dict[str, str]) -> None:
        from google.cloud import storage

        self.cloud, self.bucket_name, self.labels = cloud, bucket.removeprefix("gs://").strip("/"), labels
        # STORAGE_EMULATOR_HOST, when set, points the library at a GCS emulator.
        self.client: Any = storage.Client(project=cloud.project, credentials=cloud.credentials())

    def ensure_bucket(self) -> None:
        from google.api_core.exceptions import NotFound

        with translated(f"bucket gs://{self.bucket_name}", api="storage", project=self.cloud.project):
            try:
                self.client.get_bucket(self.bucket_name)
            except NotFound:
                bucket = self.client.bucket(self.bucket_name)
                bucket.labels = self.labels
                self.client.create_bucket(bucket, location=self.cloud.region)

    def upload(self, name: str, data: bytes, content_type: str = "application/gzip") -> str:
        with translated(f"upload gs://{self.bucket_name}/{name}", api="storage", project=self.cloud.project):
            self.client.bucket(self.bucket_name).blob(name).upload_from_string(data, content_type=content_type)
        return f"gs://{self.bucket_name}/{name}"

    def read_from(self, name: str, offset: int) -> bytes:
        """Bytes of `name` from `offset` on; b"" when it does not exist yet or has nothing new."""
        from google.api_core.exceptions import NotFound, RequestRangeNotSatisfiable

        try:
            data = self.client.bucket(self.bucket_name).blob(name).download_as_bytes(start=offset or None)
        except (NotFound, RequestRangeNotSatisfiable):
            return b""
        return bytes(data)
