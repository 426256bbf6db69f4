"""Prices for `cost`: the bundled table, or today's from the Cloud Billing catalog (cached a day beside the state)."""

from __future__ import annotations

import json
import time
from typing import Any

from sdxlctl import pricing
from sdxlctl.config import Config
from sdxlctl.errors import SdxlctlError
from sdxlctl.steps import Progress, quiet

LIVE_PRICES_MAX_AGE_S = 24 * 3600


def price_table(config: Config, *, live: bool, warn: Progress = quiet) -> pricing.PriceTable:
    """The bundled table; with `live`, today's catalog prices (cached a day beside the state), else bundled."""
    table = pricing.bundled()
    if not live:
        return table
    cache = config.home / "live-prices.json"
    try:
        cached = json.loads(cache.read_text())
        fresh = time.time() - cached["fetched_at"] < LIVE_PRICES_MAX_AGE_S
    except (OSError, ValueError, KeyError):
        cached, fresh = None, False
    if cached is not None and fresh:
        regions, fetched_at = cached["regions"], cached["fetched_at"]
    else:
        try:
            regions = _fetch_live(config, sorted({*table.regions, config.gcp.region}))
        except SdxlctlError as exc:
            warn(f"live prices unavailable ({exc.message}); using the bundled table of {table.date}")
            return table
        fetched_at = time.time()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"fetched_at": fetched_at, "regions": regions}))
    return pricing.with_live(table, regions, time.strftime("%Y-%m-%d", time.gmtime(fetched_at)))


def _fetch_live(config: Config, regions: list[str]) -> dict[str, Any]:
    from sdxlctl.gcp.billing import fetch_regions
    from sdxlctl.gcp.session import Cloud

    gcp = config.gcp  # the configured retry budget too: the catalog is retried through dropped connections
    cloud = Cloud(gcp.project or "-", gcp.region, gcp.api_endpoint.rstrip("/"), gcp.poll_interval_s, gcp.retry_s)
    try:
        return fetch_regions(cloud, regions)
    except SdxlctlError:
        raise
    except Exception as exc:  # no credentials, no network: fall back, with the reason
        raise SdxlctlError(f"{type(exc).__name__}: {exc}") from None
