"""`sdxlctl check` on target vertex, as `sky check` does for a cloud: credentials, the APIs sdxlctl calls, the GPU
quota in the region, the staging bucket and the image registry; one line each, with the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdxlctl.config import Config
from sdxlctl.errors import SdxlctlError
from sdxlctl.gcp.errors import CloudError
from sdxlctl.state import StateStore
from sdxlctl.steps import Check
from sdxlctl.vertex.names import cloud, names

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud

# What the steps call: endpoints, builds, images, the UI, the staging bucket, service accounts.
REQUIRED = (
    "aiplatform.googleapis.com",
    "cloudbuild.googleapis.com",
    "artifactregistry.googleapis.com",
    "run.googleapis.com",
    "storage.googleapis.com",
    "iam.googleapis.com",
)
OPTIONAL = {"logging.googleapis.com": "`sdxlctl logs`", "cloudquotas.googleapis.com": "the GPU quota check"}


def check(config: Config, store: StateStore) -> list[Check]:
    """Each prerequisite of the vertex steps, read (never changed) in the project."""
    from sdxlctl.gcp import project

    if not config.gcp.project:
        fix = "set project in [gcp] of sdxlctl.toml (`sdxlctl init --project ...`), or SDXLCTL_GCP_PROJECT"
        return [Check("project", "fail", "[gcp] project is not set", fix)]
    try:
        deployment, where = names(config), cloud(config)
    except SdxlctlError as exc:
        return [Check("project", "fail", exc.message, exc.hint or "")]
    found = [Check("project", "ok", f"{deployment.project}, region {deployment.region}")]
    try:
        found.append(Check("credentials", "ok", project.credentials(where)))
    except CloudError as exc:  # nothing else can be asked without them
        return [*found, Check("credentials", "fail", exc.message, "gcloud auth application-default login")]
    return [*found, *_apis(where), _quota(config, where), _bucket(where, deployment.bucket), _registry(config, where)]


def _apis(where: Cloud, required: tuple[str, ...] = REQUIRED, optional: dict[str, str] | None = None) -> list[Check]:
    """One line per API the steps call: a required one not enabled fails, an optional one warns (saying why)."""
    from sdxlctl.gcp import project

    optional = OPTIONAL if optional is None else optional
    wanted = [*required, *optional]
    try:
        enabled = project.enabled_services(where, wanted)
    except CloudError as exc:
        fix = f"gcloud services enable serviceusage.googleapis.com --project {where.project}"
        return [Check("APIs", "fail", exc.message, fix)]
    rows = []
    for service in wanted:
        fix = f"gcloud services enable {service} --project {where.project}"
        if enabled[service]:
            rows.append(Check(f"api {service}", "ok", "enabled"))
        elif service in optional:
            rows.append(Check(f"api {service}", "warn", f"not enabled: needed only for {optional[service]}", fix))
        else:
            rows.append(Check(f"api {service}", "fail", "not enabled", fix))
    return rows


def _quota(config: Config, where: Cloud) -> Check:
    """Enough of the chosen GPU for max_replicas replicas in the region: a deploy past it fails after minutes."""
    from sdxlctl.gcp import project
    from sdxlctl.gpus import gpu

    option = gpu(config.deploy.gpu)
    needed = option.count * config.deploy.max_replicas
    name, metric = f"gpu quota {option.key}", option.quota
    console = f"https://console.cloud.google.com/iam-admin/quotas?project={where.project}"
    try:
        found = project.gpu_quota(where, f"{project.QUOTA_SERVICE}/{metric}")
    except CloudError as exc:
        return Check(name, "warn", f"could not read it: {exc.message}", f"see {console} (metric {metric})")
    if found is None:
        return Check(name, "warn", f"the project lists no quota {metric}", f"see {console}")
    limit, quota_id = found
    if limit >= needed:
        return Check(name, "ok", f"{limit:g} {option.accelerator} in {where.region} (needs {needed})")
    fix = (
        f"request quota: gcloud beta quotas preferences create --project={where.project} "
        f"--service={project.QUOTA_SERVICE} --quota-id={quota_id} --preferred-value={needed} "
        f"--dimensions=region={where.region} (or {console}); or another GPU or region"
    )
    return Check(name, "fail", f"{limit:g} {option.accelerator} in {where.region}, needs {needed}", fix)


def _bucket(where: Cloud, bucket: str) -> Check:
    from sdxlctl.gcp import project

    name = "staging bucket"
    try:
        exists = project.bucket_exists(where, bucket)
    except CloudError as exc:
        return Check(
            name,
            "fail",
            exc.message,
            f"grant this account storage access to gs://{bucket}, or set [gcp] staging_bucket",
        )
    if exists:
        return Check(name, "ok", f"gs://{bucket} is readable")
    return Check(name, "ok", f"gs://{bucket} does not exist yet: `sdxlctl build` creates it")


def _registry(config: Config, where: Cloud) -> Check:
    from sdxlctl.gcp import project

    repository = config.gcp.artifact_repository
    name = "image registry"
    try:
        exists = project.repository_exists(where, repository)
    except CloudError as exc:
        return Check(name, "fail", exc.message, "grant this account roles/artifactregistry.reader on the project")
    if exists:
        return Check(name, "ok", f"{where.region}-docker.pkg.dev/{where.project}/{repository}")
    fix = (
        f"gcloud artifacts repositories create {repository} --repository-format=docker "
        f"--location={where.region} --project={where.project}"
    )
    return Check(name, "fail", f"no Artifact Registry repository {repository!r} in {where.region}", fix)
