"""Cloud Logging v2: entries:write (how a test plants entries, through the real client) and entries:list.

As Vertex AI's container logging does, each deployed model's stdout becomes entries of its endpoint
(resource aiplatform.googleapis.com/Endpoint): a JSON line's severity, time and fields, or a text line.

entries:list understands the part of the logging query language that sdxlctl and gcloud's simple reads
use: comparisons (= != > >= < <=) of resource.type, resource.labels.*, labels.*, logName, severity,
insertId and timestamp, joined by AND (or a newline), and parenthesised groups of them joined by OR.
Anything else is refused with 400, as a filter Google cannot parse is.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from google.cloud.logging_v2 import types
from starlette.requests import Request

from tests.emulator.core import ApiError, Route, World, now, parse, routes
from tests.emulator.model_servers import ModelServers

TABLE = "log-entries"
DEFAULT_PAGE = 50  # Google's default page size for entries:list
MAX_PAGE = 1000
CONTAINER_LOG = "aiplatform.googleapis.com%2Fprediction_container"
COMPARISON = re.compile(r'([\w.]+)\s*(>=|<=|!=|=|>|<)\s*"([^"]*)"')


class Logging:
    """The entries of every project, as planted: listed in timestamp order, ties by insertId."""

    def __init__(self, world: World, servers: ModelServers | None = None) -> None:
        self.world = world
        self.servers = servers
        self.read: dict[str, int] = {}  # deployed model id -> bytes of its stdout made entries so far

    def routes(self) -> list[Route]:
        return routes(
            [
                ("POST", r"/v2/entries:write", self.write_entries),
                ("POST", r"/v2/entries:list", self.list_entries),
            ]
        )

    def write_entries(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        written = parse(types.WriteLogEntriesRequest, body, "WriteLogEntriesRequest")
        shared = {key: written[key] for key in ("logName", "resource", "labels") if key in written}
        for entry in written.get("entries", []):
            full = {**shared, **entry}
            if "logName" not in full or "resource" not in full:
                raise ApiError(400, "Each log entry needs a logName and a resource.")
            full.setdefault("insertId", self.world.new_id())
            full.setdefault("timestamp", now())
            full["receiveTimestamp"] = now()
            # Cloud Logging keeps one entry per (insertId, timestamp) in a log: a repeated write is one entry.
            self.world.table(TABLE)[f"{full['logName']}|{full['insertId']}|{full['timestamp']}"] = full
        return {}

    def list_entries(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        asked = parse(types.ListLogEntriesRequest, body, "ListLogEntriesRequest")
        self._ingest()
        projects = [name.removeprefix("projects/") for name in asked.get("resourceNames", [])]
        if not projects or any("/" in project or not project for project in projects):
            raise ApiError(400, "resourceNames must name projects: projects/PROJECT_ID.")
        keep = query(asked.get("filter", ""))
        order = asked.get("orderBy", "timestamp asc").strip().lower()
        if order not in ("timestamp asc", "timestamp desc"):
            raise ApiError(400, f"Invalid orderBy {order!r}: only 'timestamp asc' and 'timestamp desc'.")
        found = [e for e in self.world.table(TABLE).values() if e["logName"].split("/")[1] in projects and keep(e)]
        found.sort(key=lambda e: (timestamp(e["timestamp"]), e["insertId"]), reverse=order.endswith("desc"))
        size = min(int(asked.get("pageSize") or DEFAULT_PAGE), MAX_PAGE)
        start = int(asked.get("pageToken") or 0)
        page: dict[str, Any] = {"entries": found[start : start + size]} if found[start : start + size] else {}
        if start + size < len(found):
            page["nextPageToken"] = str(start + size)
        return page

    def _ingest(self) -> None:
        """The deployed models' stdout written since the last read, as their endpoints' entries."""
        for endpoint in list(self.world.table("endpoints").values()):
            parts = str(endpoint.get("name", "")).split("/")
            if len(parts) != 6:
                continue
            project, location, endpoint_id = parts[1], parts[3], parts[5]
            for deployed in endpoint.get("deployedModels", []):
                replica = self.servers.get(deployed["id"]) if self.servers else None
                if replica is None or replica.log_path is None:
                    continue
                start = self.read.get(deployed["id"], 0)
                try:
                    with replica.log_path.open("rb") as log:
                        log.seek(start)
                        complete, newline, _ = log.read().rpartition(b"\n")  # a line being written waits
                except OSError:
                    continue
                if not newline:
                    continue
                self.read[deployed["id"]] = start + len(complete) + 1
                resource = {
                    "type": "aiplatform.googleapis.com/Endpoint",
                    "labels": {"endpoint_id": endpoint_id, "location": location, "resource_container": project},
                }
                for number, line in enumerate(complete.decode(errors="replace").splitlines()):
                    entry = {
                        "logName": f"projects/{project}/logs/{CONTAINER_LOG}",
                        "resource": resource,
                        "insertId": f"{deployed['id']}-{start}-{number}",
                        "receiveTimestamp": now(),
                        **_payload(line),
                    }
                    entry.setdefault("timestamp", entry["receiveTimestamp"])
                    self.world.table(TABLE)[f"{entry['logName']}|{entry['insertId']}"] = entry


def _payload(line: str) -> dict[str, Any]:
    """A stdout line as Cloud Logging's agent reads it: JSON with its special fields, else text."""
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return {"textPayload": line, "severity": "DEFAULT"}
    fields = dict(data)
    entry: dict[str, Any] = {"severity": str(fields.pop("severity", "DEFAULT")).upper()}
    when = fields.pop("time", None) or fields.pop("timestamp", None)
    if isinstance(when, str):
        entry["timestamp"] = timestamp(when).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {**entry, "jsonPayload": fields}


def timestamp(text: str) -> datetime:
    """RFC 3339 with up to nine fraction digits (Google writes nanoseconds), as a comparable time."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text))


def query(expression: str) -> Any:
    """A predicate on entries for the subset of the logging query language described above."""
    terms = [t for t in re.split(r"\s+AND\s+|\n", expression.strip()) if t.strip()]
    checks = [_term(term.strip()) for term in terms]
    return lambda entry: all(check(entry) for check in checks)


def _term(term: str) -> Any:
    if term.startswith("(") and term.endswith(")"):
        options = [_comparison(part.strip()) for part in re.split(r"\s+OR\s+", term[1:-1])]
        return lambda entry: any(option(entry) for option in options)
    return _comparison(term)


def _comparison(term: str) -> Any:
    match = COMPARISON.fullmatch(term)
    if not match:
        raise ApiError(400, f"Unparseable filter: {term!r}")
    field, op, value = match.groups()
    if not re.fullmatch(r"resource\.type|resource\.labels\.\w+|labels\.\w+|logName|severity|insertId|timestamp", field):
        raise ApiError(400, f"Unsupported field in filter: {field!r}")
    compare = {
        "=": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
    }[op]
    if field == "timestamp":
        bound = timestamp(value.replace("Z", "+00:00"))
        return lambda entry: compare(timestamp(entry["timestamp"]), bound)

    def check(entry: dict[str, Any]) -> bool:
        got: Any = entry
        for part in field.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        return got is not None and compare(str(got), value)

    return check
