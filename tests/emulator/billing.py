"""Cloud Billing Catalog v1: services and their SKUs, paged as Google pages them."""

from __future__ import annotations

from typing import Any

from google.cloud import billing_v1
from starlette.requests import Request

from tests.emulator.core import ApiError, Route, World, parse, routes

VERTEX = "services/C7E2-9256-1C43"


def sku(sku_id: str, description: str, regions: list[str], usd: float, unit: str = "h") -> dict[str, Any]:
    """A catalog entry in Google's JSON shape (checked against the Sku message); a Spot SKU's usage type is
    Preemptible, as Compute Engine's Spot SKUs are."""
    usage = "Preemptible" if "spot" in description.lower() else "OnDemand"
    units, nanos = int(usd), round((usd - int(usd)) * 1e9)
    return parse(
        billing_v1.Sku,
        {
            "name": f"{VERTEX}/skus/{sku_id}",
            "skuId": sku_id,
            "description": description,
            "category": {"serviceDisplayName": "Vertex AI", "resourceFamily": "Compute", "usageType": usage},
            "serviceRegions": regions,
            "pricingInfo": [
                {
                    "pricingExpression": {
                        "usageUnit": unit,
                        "tieredRates": [
                            {"startUsageAmount": 0, "unitPrice": {"currencyCode": "USD", "units": "0", "nanos": 0}},
                            {
                                "startUsageAmount": 0,
                                "unitPrice": {"currencyCode": "USD", "units": str(units), "nanos": nanos},
                            },
                        ],
                    }
                }
            ],
        },
        "Sku",
    )


class Billing:
    """The catalog holds whatever SKUs the test (or the command line) puts in `world`."""

    def __init__(self, world: World) -> None:
        self.world = world

    def routes(self) -> list[Route]:
        table = [
            ("GET", r"/v1/services", self.list_services),
            ("GET", r"/v1/(?P<service>services/[^/]+)/skus", self.list_skus),
        ]
        return routes(table)

    def list_services(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return {
            "services": [
                {
                    "name": VERTEX,
                    "serviceId": VERTEX.split("/")[1],
                    "displayName": "Vertex AI",
                    "businessEntityName": "businessEntities/GCP",
                }
            ]
        }

    def list_skus(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        skus = [s for s in self.world.table("skus").values() if s["name"].startswith(p["service"] + "/")]
        size = int(request.query_params.get("pageSize") or 2)  # small pages, so paging is exercised
        start = int(request.query_params.get("pageToken") or 0)
        if start > len(skus):
            raise ApiError(400, "Invalid page token.")
        page: dict[str, Any] = {"skus": skus[start : start + size]}
        if start + size < len(skus):
            page["nextPageToken"] = str(start + size)
        return page
