"""Target vertex: who may do what. The model server's and the UI's service accounts, and their grants."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdxlctl.config import Config
from sdxlctl.state import Resource, StateStore
from sdxlctl.steps import Change, Progress
from sdxlctl.vertex.names import bucket_of, cloud, compile_cache, names, server_account, server_buckets

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud

CACHE_ROLE = "roles/storage.objectUser"  # read, write, list and overwrite objects; no say over the bucket
WEIGHTS_ROLE = "roles/storage.objectViewer"
# The UI's account may call predict on its endpoint and nothing else (not undeploy, update or delete, which
# roles/aiplatform.user would allow): a project role shared by every deployment, kept by teardown.
PREDICT_ROLE_ID = "sdxlctlEndpointPredictor"
PREDICT_PERMISSIONS = ["aiplatform.endpoints.predict"]
PREDICT_FALLBACK_ROLE = "roles/aiplatform.user"


def ensure_server_account(config: Config, store: StateStore, progress: Progress, changes: list[Change]) -> str:
    """The account the model server runs as, when it needs one: it may write the compile cache and read
    gs:// weights (the base's, a refiner's), nothing else. Empty: Vertex AI's own account, which may only
    read the artifacts."""
    email = server_account(config)
    if not email:
        return ""
    from sdxlctl.gcp.iam import ServiceAccounts
    from sdxlctl.gcp.storage import Storage

    c, n, model = cloud(config), names(config), config.model
    cache = compile_cache(config)
    progress("giving the model server an account that may " + ("write its compile cache" if cache else "read gs://"))
    ServiceAccounts(c).ensure(n.server_account_id, f"sdxlctl model server of {config.name}")
    store.record(config.name, Resource(kind="server-account", name=email, target="vertex"))
    grants = []
    if cache.startswith("gs://"):
        Storage(c, bucket_of(cache), n.labels).ensure_bucket()
        grants.append(_grant_folder(c, CACHE_ROLE, email, cache, changes))
    if model.source.startswith("gs://") and not model.bake:  # baked: the image has them
        grants.append(_grant_folder(c, WEIGHTS_ROLE, email, model.source, changes))
    if model.refiner.startswith("gs://"):  # never baked: fetched at every start, as its own account
        grants.append(_grant_folder(c, WEIGHTS_ROLE, email, model.refiner, changes))
    granted = any(done for done, _ in grants)
    changes.append(Change("update" if granted else "keep", "service account", email, ", ".join(d for _, d in grants)))
    return email


def refiner_detail(config: Config) -> str:
    """How the server gets its refiner, for the deploy plan."""
    detail = "fetched by the server at every start (its UNet only: the VAE and text_encoder_2 are the base's)"
    if config.model.refiner.startswith("gs://"):
        detail += f"; read as the server's own account, with {WEIGHTS_ROLE}"
    if config.model.bake:
        detail += "; [model] bake puts the base's weights in the image, not the refiner's"
    return detail


def _grant_folder(c: Cloud, role: str, email: str, uri: str, changes: list[Change]) -> tuple[bool, str]:
    """`role` on the objects of the gs:// folder `uri` only, when its bucket lets IAM conditions say so;
    else on the whole bucket, with a warning. Whether the policy changed, and what was granted."""
    from sdxlctl.gcp.storage import Storage

    bucket, _, folder = uri.removeprefix("gs://").partition("/")
    folder = folder.strip("/")
    storage = Storage(c, bucket, {})
    if folder and not storage.uniform_access():
        changes.append(
            Change(
                "warn",
                "bucket",
                f"gs://{bucket}",
                f"without uniform bucket-level access IAM conditions are refused: {role} covers every object, "
                f"not only {folder}/ (gcloud storage buckets update gs://{bucket} --uniform-bucket-level-access)",
            )
        )
        folder = ""
    granted = storage.grant(role, f"serviceAccount:{email}", prefix=folder)
    return granted, f"{role} on " + (f"gs://{bucket}/{folder}/ only" if folder else f"all of gs://{bucket}")


def predict_role(c: Cloud, changes: list[Change]) -> str:
    """The project's predict-only role, made when missing; roles/aiplatform.user, with a warning that says
    how to make it, when the caller may not manage roles."""
    from sdxlctl.gcp.iam import Roles, RolesDenied

    roles = Roles(c)
    name = roles.name(PREDICT_ROLE_ID)
    try:
        done = roles.ensure(
            PREDICT_ROLE_ID,
            title="sdxlctl endpoint predictor",
            description="Call predict on a Vertex AI endpoint, nothing else (sdxlctl's UI accounts)",
            permissions=PREDICT_PERMISSIONS,
        )
    except RolesDenied as denied:
        changes.append(
            Change(
                "warn",
                "custom role",
                name,
                f"{denied.message}: the UI gets {PREDICT_FALLBACK_ROLE}, which may also undeploy, update and "
                f"delete the endpoint. Have a role administrator run `gcloud iam roles create {PREDICT_ROLE_ID} "
                f"--project={c.project} --title='sdxlctl endpoint predictor' "
                f"--permissions={','.join(PREDICT_PERMISSIONS)} --stage=GA`, then run ui-deploy again",
            )
        )
        return PREDICT_FALLBACK_ROLE
    action = {"created": "create", "restored": "update", "corrected": "update"}.get(done, "keep")
    changes.append(Change(action, "custom role", name, f"{', '.join(PREDICT_PERMISSIONS)} only ({done})"))
    return name


def revoke_grants(config: Config, store: StateStore, endpoints: list[Any], email: str) -> None:
    """What sdxlctl granted the account: the server's roles on buckets; the UI's role on an endpoint that
    teardown could not delete (a deleted endpoint took its policy with it)."""
    from sdxlctl.gcp.storage import Storage
    from sdxlctl.gcp.vertex import Vertex

    c, n, account_id = cloud(config), names(config), email.split("@")[0]
    if account_id == n.server_account_id:
        for bucket in sorted(server_buckets(config)):
            Storage(c, bucket, {}).revoke(f"serviceAccount:{email}")
    if account_id == n.account_id:
        recorded = store.read().get(config.name, "endpoint")
        endpoint_names = [e.name for e in endpoints] + ([recorded.name] if recorded and recorded.name else [])
        for endpoint in dict.fromkeys(endpoint_names):
            Vertex(c).revoke(endpoint, f"serviceAccount:{email}")


def kept_role(config: Config, accounts: list[str]) -> list[Change]:
    """The predict-only role stays: every sdxlctl UI in the project holds it, and a deleted role's id is
    taken for weeks. Said once the UI's account is gone, with how to delete it."""
    if not any(email.split("@")[0] == names(config).account_id for email in accounts):
        return []
    project = config.gcp.project
    return [
        Change(
            "keep",
            "custom role",
            f"projects/{project}/roles/{PREDICT_ROLE_ID}",
            f"shared by every sdxlctl UI in the project; once none is left: "
            f"gcloud iam roles delete {PREDICT_ROLE_ID} --project={project}",
        )
    ]
