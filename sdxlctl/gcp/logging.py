"""Cloud Logging: reading log entries (the only import of google.cloud.logging)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sdxlctl.gcp.errors import translated
from sdxlctl.gcp.session import Cloud

LOGGING_HOST = "https://logging.googleapis.com"
REQUEST_TIMEOUT_S = 30.0  # one page of entries
PAGE_SIZE = 1000  # Cloud Logging's largest page: the read quota (60 a minute) counts pages


@dataclass(frozen=True)
class Entry:
    """One log entry as sdxlctl shows it."""

    timestamp: datetime
    insert_id: str
    severity: str
    text: str


class Logs:
    """Entries of one project, through google-cloud-logging's JSON API (the emulator speaks only that)."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        self._client: Any = None

    def _logging(self) -> Any:
        if self._client is None:
            from google.cloud import logging as cloud_logging

            client = cloud_logging.Client(
                project=self.cloud.project,
                credentials=self.cloud.credentials(),
                _use_grpc=False,
                client_options={"api_endpoint": self.cloud.api_endpoint or LOGGING_HOST},
            )
            # The library's pager passes no timeout (its default is 60 s): bound each page here instead.
            connection = client._connection
            connection.api_request = functools.partial(connection.api_request, timeout=REQUEST_TIMEOUT_S)
            self._client = client
        return self._client

    def entries(self, filter_: str, *, newest_first: bool = False, limit: int | None = None) -> list[Entry]:
        """The entries matching `filter_` (which should bound the time), oldest first unless asked otherwise."""
        from google.cloud.logging import ASCENDING, DESCENDING

        client = self._logging()

        def fetch() -> list[Entry]:
            listed = client.list_entries(
                resource_names=[f"projects/{self.cloud.project}"],
                filter_=filter_,
                order_by=DESCENDING if newest_first else ASCENDING,
                max_results=limit,
                page_size=min(PAGE_SIZE, limit) if limit else PAGE_SIZE,
            )
            return [_entry(entry) for entry in listed]

        with translated("read the logs", api="logging", project=self.cloud.project, region=self.cloud.region):
            return list(self.cloud.retry()(fetch)())


def _entry(entry: Any) -> Entry:
    """A library entry (text, JSON or protobuf payload; a request log has none) as one line of text."""
    payload = entry.payload
    if isinstance(payload, str):
        text = payload
    elif isinstance(payload, dict):
        rest = {k: v for k, v in payload.items() if k != "message"}
        text = " ".join(
            part for part in (str(payload.get("message", "")), json.dumps(rest, default=str) if rest else "") if part
        )
    elif payload is not None:
        text = str(payload)
    else:
        text = ""
    request = entry.http_request or {}
    if not text and request:  # Cloud Run's request log: the request is the entry
        text = f"{request.get('requestMethod', '')} {request.get('status', '')} {request.get('requestUrl', '')}"
    timestamp = entry.timestamp or datetime.now(UTC)
    return Entry(timestamp, entry.insert_id or "", entry.severity or "DEFAULT", text.strip())
