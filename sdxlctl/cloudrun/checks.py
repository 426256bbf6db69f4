"""`sdxlctl check` on target cloudrun, as on target vertex: credentials, the APIs its steps call, L4s in the
region, the project's L4 quota of the configured kind (with or without zonal redundancy) against max_instances,
the staging bucket and the image registry; one line each, with the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdxlctl.config import Config
from sdxlctl.errors import SdxlctlError
from sdxlctl.gcp.errors import CloudError
from sdxlctl.gpus import CLOUD_RUN_GPU
from sdxlctl.state import StateStore
from sdxlctl.steps import Check
from sdxlctl.vertex.checks import _apis, _bucket, _registry  # the same APIs check, build, bucket and registry
from sdxlctl.vertex.names import cloud, names

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud

RUN_SERVICE = "run.googleapis.com"  # Cloud Run's own quotas are under its service, not Vertex AI's
# What the steps call: the services and their IAM, the image build and registry, the staging bucket, accounts.
REQUIRED = (
    RUN_SERVICE,
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "storage.googleapis.com",
    "iam.googleapis.com",
)
OPTIONAL = {
    "monitoring.googleapis.com": "status' instance count and cost so far",
    "logging.googleapis.com": "`sdxlctl logs`",
    "cloudquotas.googleapis.com": "the L4 quota check",
}


def check(config: Config, store: StateStore) -> list[Check]:
    """Each prerequisite of the cloudrun steps, read (never changed) in the project."""
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
    return [
        *found,
        *_apis(where, REQUIRED, OPTIONAL),
        _region(where),
        _quota(config, where),
        _bucket(where, deployment.bucket),
        _registry(config, where),
    ]


def _region(where: Cloud) -> Check:
    problem = CLOUD_RUN_GPU.region_problem(where.region)
    if problem:
        return Check("region", "fail", problem, "set [gcp] region to one of those")
    return Check("region", "ok", f"Cloud Run has L4 GPUs in {where.region}")


def _quota(config: Config, where: Cloud) -> Check:
    """Enough L4s of the configured kind for max_instances: Cloud Run refuses a deploy past it."""
    from sdxlctl.gcp import project

    zonal = config.cloudrun.zonal_redundancy
    needed = config.cloudrun.max_instances  # one L4 per instance
    quota, quota_id, page = CLOUD_RUN_GPU.quota(zonal), CLOUD_RUN_GPU.quota_id(zonal), CLOUD_RUN_GPU.quota_page
    name = f"gpu quota {CLOUD_RUN_GPU.key}"
    try:
        found = project.gpu_quota(where, quota_id, service=RUN_SERVICE)
    except CloudError as exc:
        return Check(name, "warn", f"could not read it: {exc.message}", f"see {page} ({quota})")
    if found is None:
        return Check(name, "warn", f"the project lists no quota {quota_id} ({quota})", f"see {page}")
    limit, _ = found
    if limit >= needed:
        return Check(name, "ok", f"{limit:g} L4 in {where.region} (needs {needed}): {quota}")
    other = "; or set [cloudrun] zonal_redundancy = false (its own quota, cheaper)" if zonal else ""
    fix = (
        f"request quota: gcloud beta quotas preferences create --project={where.project} --service={RUN_SERVICE} "
        f"--quota-id={quota_id} --preferred-value={needed} --dimensions=region={where.region} (or {page}); "
        f"or lower [cloudrun] max_instances{other}"
    )
    return Check(name, "fail", f"{limit:g} L4 in {where.region}, needs {needed}: {quota}", fix)
