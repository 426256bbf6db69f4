"""What a project offers sdxlctl, for `sdxlctl check`: credentials, enabled APIs, GPU quota, bucket, registry.

Each function answers a fact or raises CloudError with the reason; none changes anything.
"""

from __future__ import annotations

from typing import Any

from sdxlctl.gcp.errors import CloudError
from sdxlctl.gcp.session import Cloud

TIMEOUT_S = 30.0
QUOTA_SERVICE = "aiplatform.googleapis.com"  # Vertex AI serving has GPU quotas of its own, apart from Compute's


def credentials(cloud: Cloud) -> str:
    """Who sdxlctl would act as (Application Default Credentials); CloudError when there are none."""
    if cloud.emulated:
        return f"none needed: {cloud.api_endpoint} is an emulator on this machine"
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        found, project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except DefaultCredentialsError as exc:
        raise CloudError(_first_line(exc)) from None
    who = getattr(found, "service_account_email", None) or getattr(found, "account", None) or ""
    kind = KINDS.get(type(found).__module__.rsplit(".", 1)[-1], type(found).__name__)
    mine = f" of {who}" if who and who != "default" else ""
    return f"{kind}{mine}" + (f" (their project: {project})" if project else "")


# google.auth's modules by the kind of account they hold, as `gcloud auth list` would name it.
KINDS = {
    "credentials": "user credentials (gcloud auth application-default login)",
    "service_account": "a service account key",
    "compute_engine": "this VM's service account",
    "external_account": "workload identity federation",
    "impersonated_credentials": "an impersonated service account",
}


def enabled_services(cloud: Cloud, services: list[str]) -> dict[str, bool]:
    """Whether each API (aiplatform.googleapis.com, ...) is enabled in the project (Service Usage batchGet)."""
    from google.cloud import service_usage_v1

    client: Any = cloud.client(service_usage_v1.ServiceUsageClient, "serviceusage.googleapis.com")
    parent = f"projects/{cloud.project}"
    try:
        answer = client.batch_get_services(
            request={"parent": parent, "names": [f"{parent}/services/{name}" for name in services]},
            retry=cloud.retry(),
            timeout=TIMEOUT_S,
        )
    except Exception as exc:
        raise CloudError(f"Service Usage: {_first_line(exc)}") from None
    enabled = {s.name.rsplit("/", 1)[-1]: s.state == service_usage_v1.State.ENABLED for s in answer.services}
    return {name: enabled.get(name, False) for name in services}


def gpu_quota(cloud: Cloud, metric: str, *, service: str = QUOTA_SERVICE) -> tuple[float, str] | None:
    """The project's limit of `metric` (a Vertex AI serving GPU quota; or a quota id, as Cloud Run's L4 quotas
    are known, with `service` run.googleapis.com) in the cloud's region, and the quota's id (what a request for
    more names); None where the project lists no such quota.

    Through the Cloud Quotas API (as `gcloud beta quotas info list` does): a region's own value, else the
    value every region has.
    """
    from google.cloud import cloudquotas_v1

    client: Any = cloud.client(cloudquotas_v1.CloudQuotasClient, "cloudquotas.googleapis.com")
    parent = f"projects/{cloud.project}/locations/global/services/{service}"
    try:
        infos = list(client.list_quota_infos(request={"parent": parent}, retry=cloud.retry(), timeout=TIMEOUT_S))
    except Exception as exc:
        raise CloudError(f"Cloud Quotas: {_first_line(exc)}") from None
    for info in infos:
        if metric not in (info.metric, info.quota_id):
            continue
        values = {dict(d.dimensions).get("region", ""): float(d.details.value) for d in info.dimensions_infos}
        value = values.get(cloud.region, values.get(""))
        return None if value is None else (value, str(info.quota_id))
    return None


def bucket_exists(cloud: Cloud, bucket: str) -> bool:
    """Whether the bucket exists; CloudError when it cannot be read (no access, no network)."""
    from google.cloud import storage

    client: Any = storage.Client(project=cloud.project, credentials=cloud.credentials())
    try:
        return client.lookup_bucket(bucket, timeout=TIMEOUT_S) is not None
    except Exception as exc:
        raise CloudError(f"gs://{bucket}: {_first_line(exc)}") from None


def repository_exists(cloud: Cloud, repository: str) -> bool:
    """Whether the Artifact Registry repository exists in the region; CloudError when it cannot be read."""
    import requests
    from google.auth.transport.requests import AuthorizedSession

    name = f"projects/{cloud.project}/locations/{cloud.region}/repositories/{repository}"
    base = cloud.api_endpoint or "https://artifactregistry.googleapis.com"
    try:
        response = AuthorizedSession(cloud.credentials()).get(f"{base}/v1/{name}", timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        raise CloudError(f"Artifact Registry: {_first_line(exc)}") from None
    if response.status_code == 404:
        return False
    if response.status_code != 200:
        message = _answer_message(response)
        raise CloudError(f"Artifact Registry answered {response.status_code}: {message}")
    return True


def _answer_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
