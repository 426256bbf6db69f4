"""Cloud Monitoring: how many instances a Cloud Run service runs now, and how long its instances were billed.

Over Monitoring's REST API (projects.timeSeries.list) with google-auth's AuthorizedSession: the
emulator's credentials are anonymous, as every other client's. Status only looks: a refusal, an API
that is not enabled or an answer that cannot be read is None ("unknown"), never an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sdxlctl.gcp.session import Cloud

MONITORING_HOST = "https://monitoring.googleapis.com"
INSTANCE_COUNT = "run.googleapis.com/container/instance_count"
BILLABLE_TIME = "run.googleapis.com/container/billable_instance_time"
TIMEOUT_S = 15.0  # one page: status must not hang on a metric
MAX_PAGES = 50  # a bound on a listing that never ends (each page holds many points)
# instance_count is sampled every 60 s and may show up to 180 s late: the newest sample in this window is "now"
RECENT = timedelta(minutes=5)


def instance_count(cloud: Cloud, service_id: str, *, now: datetime | None = None) -> int | None:
    """The service's instances now (0 when scaled to zero): the newest sample of each series (state active,
    idle; one per revision) added up; None when Monitoring cannot be read."""
    end = now or datetime.now(UTC)
    series = _series(cloud, INSTANCE_COUNT, service_id, end - RECENT, end)
    if series is None:
        return None
    total = 0
    for one in series:
        points = _points(one)
        if points:  # newest first, as Monitoring lists them; ordered here all the same
            newest = max(points, key=lambda point: str(point.get("interval", {}).get("endTime", "")))
            total += int(_number(newest) or 0)
    return total


def billable_seconds(cloud: Cloud, service_id: str, start: datetime, end: datetime) -> float | None:
    """Instance-seconds Cloud Run billed the service between `start` and `end` (the points are per-minute
    deltas, summed); None when Monitoring cannot be read. Monitoring keeps Cloud Run's metrics six weeks."""
    if end <= start:
        return 0.0
    series = _series(cloud, BILLABLE_TIME, service_id, start, end)
    if series is None:
        return None
    return float(sum(_number(point) or 0.0 for one in series for point in _points(one)))


def _points(series: dict[str, Any]) -> list[dict[str, Any]]:
    points = series.get("points")
    return [point for point in points if isinstance(point, dict)] if isinstance(points, list) else []


def _number(point: dict[str, Any]) -> float | None:
    """A point's value; None for one that is no count or time (NaN, infinite, negative: not to be billed)."""
    import math

    value = point.get("value")
    for key in ("int64Value", "doubleValue"):
        if isinstance(value, dict) and key in value:
            try:
                number = float(value[key])
            except (TypeError, ValueError):
                return None
            return number if math.isfinite(number) and number >= 0 else None
    return None


def _series(cloud: Cloud, metric: str, service_id: str, start: datetime, end: datetime) -> list[dict[str, Any]] | None:
    """Every time series of `metric` for the service in [start, end], or None when it cannot be read."""
    import re

    if not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", service_id):  # a quote would rewrite the filter: no such service
        return None
    try:
        return list(_pages(cloud, metric, service_id, start, end))
    except _Unreadable:
        return None


class _Unreadable(Exception):
    """Monitoring refused, is not enabled, or answered what is not a listing."""


def _pages(cloud: Cloud, metric: str, service_id: str, start: datetime, end: datetime) -> Iterator[dict[str, Any]]:
    import google.auth.exceptions
    import requests
    from google.auth.transport.requests import AuthorizedSession

    url = f"{cloud.api_endpoint or MONITORING_HOST}/v3/projects/{cloud.project}/timeSeries"
    params = {
        # the region too: a service of the same name in another region is another service
        "filter": f'metric.type="{metric}" AND resource.labels.service_name="{service_id}" '
        f'AND resource.labels.location="{cloud.region}"',
        "interval.startTime": _rfc3339(start),
        "interval.endTime": _rfc3339(end),
    }
    try:
        session = AuthorizedSession(cloud.credentials())
    except google.auth.exceptions.GoogleAuthError as exc:
        raise _Unreadable(str(exc)) from None
    for _ in range(MAX_PAGES):
        try:
            answer = session.get(url, params=params, timeout=TIMEOUT_S)
            page = answer.json() if answer.status_code == 200 else None
        except (requests.RequestException, google.auth.exceptions.GoogleAuthError, ValueError) as exc:
            raise _Unreadable(str(exc)) from None
        if not isinstance(page, dict):
            raise _Unreadable(f"HTTP {answer.status_code}")
        series = page.get("timeSeries") or []
        if not isinstance(series, list):
            raise _Unreadable("timeSeries is not a list")
        yield from (one for one in series if isinstance(one, dict))
        token = page.get("nextPageToken")
        if not token:
            return
        params["pageToken"] = str(token)
    raise _Unreadable(f"more than {MAX_PAGES} pages")


def _rfc3339(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
