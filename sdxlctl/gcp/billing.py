"""Live prices from the Cloud Billing Catalog API, matched to the GPU table's parts."""

from __future__ import annotations

import re
from typing import Any

from sdxlctl.gcp.errors import translated
from sdxlctl.gcp.session import Cloud
from sdxlctl.gpus import GPUS
from sdxlctl.pricing.table import KINDS

VERTEX_SERVICE = "services/C7E2-9256-1C43"
PREFIX = "vertex ai: online/batch prediction "
FAMILIES = "|".join(sorted({option.family for option in GPUS.values()}))
PART = re.compile(rf"^(?P<family>{FAMILIES})\b.*instance (?P<part>core|ram)\b")
# A Spot SKU says so in its description ("Spot Preemptible ...", as Compute Engine's do) and in its category's
# usage type ("Preemptible"); without those words it is the on-demand SKU of the same part.
SPOT_WORDS = re.compile(r"\((?:spot|preemptible)\)|\b(?:spot|preemptible)\b")


def unit_price(sku: Any) -> float:
    """The last tier's unit price: the on-demand rate once any free tier is used up."""
    money = sku.pricing_info[0].pricing_expression.tiered_rates[-1].unit_price
    return float(money.units) + money.nanos / 1e9


def fetch_regions(cloud: Cloud, regions: list[str]) -> dict[str, dict[str, Any]]:
    """{region: {"gpu": {...}, "vcpu": {...}, "ram": {...}, "spot_gpu": {...}, ...}} from the catalog, for the
    regions asked: on-demand and Spot SKUs of the same parts."""
    from google.cloud import billing_v1

    client: Any = cloud.client(billing_v1.CloudCatalogClient, "cloudbilling.googleapis.com")
    found: dict[str, dict[str, Any]] = {r: {kind: {} for kind in KINDS} for r in regions}
    with translated("read the Cloud Billing catalog", api="cloudbilling", project=cloud.project):
        for sku in client.list_skus(request={"parent": VERTEX_SERVICE}, retry=cloud.retry()):
            description = sku.description.lower()
            spot = bool(SPOT_WORDS.search(description)) or sku.category.usage_type.lower() == "preemptible"
            description = " ".join(SPOT_WORDS.sub(" ", description).split())
            if not description.startswith(PREFIX):
                continue  # management fees, training...
            rest = description[len(PREFIX) :]
            entry = _classify(rest)
            if entry is None:
                continue
            kind, key = entry
            try:
                usd = unit_price(sku)
            except IndexError:  # listed with no price (yet): the bundled rate stands for this part alone
                continue
            kind = f"spot_{kind}" if spot else kind
            for region in sku.service_regions:
                if region in found and key not in found[region][kind]:
                    found[region][kind][key] = {
                        "usd": usd,
                        "verified": True,
                        "source": f"Cloud Billing SKU {sku.sku_id} '{sku.description}'",
                    }
    return found


def _classify(rest: str) -> tuple[str, str] | None:
    for key, option in GPUS.items():
        if re.match(option.sku, rest):
            return "gpu", key
    match = PART.match(rest)
    if match:
        return ("vcpu" if match["part"] == "core" else "ram"), match["family"]
    return None
