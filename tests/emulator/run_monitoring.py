"""Cloud Monitoring's timeSeries read, for the two Cloud Run metrics sdxlctl reads, from the emulator's instances.

`GET /v3/projects/{project}/timeSeries?filter=...&interval.startTime=...&interval.endTime=...` with
`metric.type="run.googleapis.com/container/instance_count"` (a GAUGE: instances running now, state "active")
or `.../container/billable_instance_time` (a DELTA: seconds instances were up within the interval), narrowed
by `resource.labels.service_name="<id>"`. A service with no instance ever has no series (no timeSeries key).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from starlette.requests import Request

from tests.emulator.core import ApiError, Route, World, routes
from tests.emulator.run_instances import RunInstances

METRICS = ("run.googleapis.com/container/instance_count", "run.googleapis.com/container/billable_instance_time")
TERM = re.compile(r'\s*([\w.]+)\s*=\s*"([^"]*)"\s*')


class Monitoring:
    def __init__(self, world: World, instances: RunInstances) -> None:
        self.world = world
        self.instances = instances

    def routes(self) -> list[Route]:
        return routes([("GET", r"/v3/projects/(?P<project>[^/]+)/timeSeries", self.time_series)])

    def time_series(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        query = request.query_params
        terms = _terms(query.get("filter", ""))
        metric = terms.get("metric.type")
        if metric is None:
            raise ApiError(400, "Field filter had an invalid value: a filter must specify a metric.type.")
        start, end = _time(query, "interval.startTime"), _time(query, "interval.endTime")
        if start > end:
            raise ApiError(400, "Field interval.startTime had an invalid value: it must not be after endTime.")
        wanted = terms.get("resource.labels.service_name")
        series = []
        for name in list(self.instances.lives):
            project, service_id = name.split("/")[1], name.rsplit("/", 1)[-1]
            if project != p["project"] or (wanted is not None and wanted != service_id) or metric not in METRICS:
                continue
            interval = {"startTime": query["interval.startTime"], "endTime": query["interval.endTime"]}
            if metric.endswith("instance_count"):
                value: dict[str, Any] = {"int64Value": str(self.instances.count(name))}
                labels = {"state": "active"}
                interval = {"startTime": query["interval.endTime"], "endTime": query["interval.endTime"]}
            else:
                value = {"doubleValue": self.instances.billable_seconds(name, start.timestamp(), end.timestamp())}
                labels = {}
            series.append(
                {
                    "metric": {"type": metric, "labels": labels},
                    "resource": {
                        "type": "cloud_run_revision",
                        "labels": {"project_id": project, "service_name": service_id, "location": name.split("/")[3]},
                    },
                    "metricKind": "GAUGE" if metric.endswith("instance_count") else "DELTA",
                    "valueType": "INT64" if metric.endswith("instance_count") else "DOUBLE",
                    "points": [{"interval": interval, "value": value}],
                }
            )
        return {"timeSeries": series} if series else {}


def _terms(expression: str) -> dict[str, str]:
    """`key="value"` terms joined by AND (the filters sdxlctl sends); anything else is refused as Google does."""
    terms: dict[str, str] = {}
    for part in re.split(r"\s+AND\s+", expression.strip()) if expression.strip() else []:
        match = TERM.fullmatch(part)
        if not match:
            raise ApiError(400, f"Field filter had an invalid value of {expression!r}: cannot parse {part!r}.")
        terms[match.group(1)] = match.group(2)
    return terms


def _time(query: Any, key: str) -> datetime:
    raw = query.get(key)
    if not raw:
        raise ApiError(400, f"Field {key} had an invalid value: it is required.")
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"Field {key} had an invalid value of {raw!r}: expected RFC 3339.") from None
