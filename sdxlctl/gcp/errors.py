"""Google's errors, as one line and the fix: which role, which API to enable, which region to try."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from sdxlctl.errors import SdxlctlError

# The role a step needs, by the API it calls.
ROLES = {
    "aiplatform": "roles/aiplatform.user",
    "cloudbuild": "roles/cloudbuild.builds.editor",
    "run": "roles/run.admin",
    "storage": "roles/storage.admin",
    "iam": "roles/iam.serviceAccountAdmin",
    "artifactregistry": "roles/artifactregistry.repoAdmin",
    "logging": "roles/logging.viewer",
}
APIS = {
    "aiplatform": "aiplatform.googleapis.com",
    "cloudbuild": "cloudbuild.googleapis.com",
    "run": "run.googleapis.com",
    "storage": "storage.googleapis.com",
    "iam": "iam.googleapis.com",
    "artifactregistry": "artifactregistry.googleapis.com",
    "logging": "logging.googleapis.com",
}


class CloudError(SdxlctlError):
    """A Google API refused or failed a call."""


class OperationPending(CloudError):
    """A long-running operation whose end was not seen (too slow, or its polls kept failing): it may go
    on in the cloud, so it stays recorded and the next run waits for it instead of starting another."""


RERUN = "running the step again resumes where this one stopped"


@contextmanager
def translated(action: str, *, api: str, project: str, region: str = "") -> Iterator[None]:
    """Turn any Google API error raised inside into a CloudError that says what to do."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc
    from google.protobuf import json_format

    try:
        yield
    except CloudError:
        raise
    except auth_exc.DefaultCredentialsError:
        raise CloudError(
            f"{action}: no Google Cloud credentials found",
            hint="run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS",
        ) from None
    except gexc.RetryError as exc:  # transient failures outlasted the retry budget
        cause = exc.cause
        last = getattr(cause, "message", None) or (type(cause).__name__ if cause else "no answer")
        raise CloudError(
            f"{action}: gave up after retrying ({exc.message.lower()}); the last answer: {last}",
            hint=f"Google's {APIS.get(api, api)} did not answer usably; {RERUN}"
            " ([gcp] retry_s sets how long to keep trying)",
        ) from None
    except gexc.GoogleAPICallError as exc:
        raise explain(exc, action, api=api, project=project, region=region) from None
    except (requests.RequestException, json_format.ParseError) as exc:
        what = "a garbled answer" if isinstance(exc, json_format.ParseError | ValueError) else "no answer"
        raise CloudError(
            f"{action}: {what} from {APIS.get(api, api)} ({type(exc).__name__})",
            hint=f"check the network or proxy; {RERUN}",
        ) from None


def explain(exc: Exception, action: str, *, api: str, project: str, region: str = "") -> CloudError:
    """The one-line message and hint for a Google API error."""
    from google.api_core import exceptions as gexc

    message = getattr(exc, "message", None) or str(exc)
    text = f"{action}: {message}"
    lowered = message.lower()
    if "has not been used" in lowered or "service_disabled" in lowered or "is disabled" in lowered:
        service = APIS.get(api, f"{api}.googleapis.com")
        return CloudError(
            f"{action}: the {service} API is not enabled in project {project}",
            hint=f"gcloud services enable {service} --project {project}",
        )
    if "iam.serviceaccounts.actas" in lowered:  # deploying a model that runs as its own account
        account = re.search(r"[\w.-]+@[\w.-]+\.iam\.gserviceaccount\.com", message)
        email = account.group(0) if account else "ACCOUNT"
        return CloudError(
            text,
            hint=f"you may not act as {email}: gcloud iam service-accounts add-iam-policy-binding {email} "
            f"--member=user:YOU@example.com --role=roles/iam.serviceAccountUser --project {project}; "
            'or set [model] compile_cache = "none" (the server then compiles at every start)',
        )
    if isinstance(exc, gexc.PermissionDenied | gexc.Forbidden):
        role = ROLES.get(api, "the needed role")
        return CloudError(
            text,
            hint=f"grant {role}: gcloud projects add-iam-policy-binding {project} "
            f"--member=user:YOU@example.com --role={role}",
        )
    if isinstance(exc, gexc.Unauthenticated | gexc.Unauthorized):
        return CloudError(text, hint="run `gcloud auth application-default login`")
    if _is_stockout(lowered):
        return CloudError(
            text,
            hint=f"no such GPU is free in {region or 'this region'} now: try another region "
            "(SDXLCTL_GCP_REGION=...), another --gpu, or again later",
        )
    if api == "run" and "quota" in lowered and "gpu" in lowered:
        return gpu_quota(message, action, project=project, region=region)
    if isinstance(exc, gexc.ResourceExhausted | gexc.TooManyRequests) or "quota" in lowered:
        metric = re.search(r"quota (?:metric|for) '?([\w./-]+)", message)
        what = f" ({metric.group(1)})" if metric else ""
        return CloudError(
            text,
            hint=f"quota exceeded{what}: request more at "
            f"https://console.cloud.google.com/iam-admin/quotas?project={project}, "
            "or use another region or GPU (`sdxlctl cost --compare`)",
        )
    if isinstance(exc, gexc.NotFound):
        return CloudError(text, hint="it may have been deleted outside sdxlctl; `sdxlctl status` shows what exists")
    return CloudError(text)


def gpu_quota(message: str, action: str, *, project: str, region: str) -> CloudError:
    """Cloud Run's refusal of a GPU service for want of quota, naming the quota to ask for and where.

    Google's message says which kind ("... GPUs with zonal redundancy" or "without"); the quota counts
    the L4s of max instances, so fewer instances or the other kind may fit in what the project has."""
    from sdxlctl.gpus import CLOUD_RUN_GPU

    message = re.sub(r"^[A-Z]+ https?://\S+: ", "", message)  # the REST client's "POST http://...: " prefix
    lowered = message.lower()
    kinds = (
        [False] if "without" in lowered or "no zonal" in lowered else [True] if "zonal" in lowered else [False, True]
    )
    quotas = " or ".join(f"'{CLOUD_RUN_GPU.quota(zonal)}'" for zonal in kinds)
    where = region or "this region"
    hint = f"request it at {CLOUD_RUN_GPU.quota_page}&project={project}, or lower [cloudrun] max_instances"
    if kinds == [True]:
        hint += "; or set [cloudrun] zonal_redundancy = false (its own quota, cheaper)"
    return CloudError(f"{action}: no GPU quota for Cloud Run: {quotas} in {where} ({message})", hint=hint)


def _is_stockout(lowered: str) -> bool:
    return any(
        word in lowered
        for word in (
            "stockout",
            "resource_pool_exhausted",
            "resources are insufficient",
            "does not have enough resources",
            "zone_resource_pool",
        )
    )
