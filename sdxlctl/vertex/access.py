"""Target vertex: who may do what. The model server's and the UI's service accounts, and their grants."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdxlctl.config import Config
from sdxlctl.lora_sources import gs_folder
from sdxlctl.state import Resource, StateStore
from sdxlctl.steps import Change, Progress
from sdxlctl.vertex.names import (
    bucket_of,
    cloud,
    compile_cache,
    lora_reads,
    names,
    server_account,
    server_buckets,
)

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud

CACHE_ROLE = "roles/storage.objectUser"  # read, write, list and overwrite objects; no say over the bucket
WEIGHTS_ROLE = "roles/storage.objectViewer"
SERVER_ROLES = (CACHE_ROLE, WEIGHTS_ROLE)  # every role sdxlctl gives the server's account on a bucket
# The UI's account may call predict on its endpoint and nothing else (not undeploy, update or delete, which
# roles/aiplatform.user would allow): a project role shared by every deployment, kept by teardown.
PREDICT_ROLE_ID = "sdxlctlEndpointPredictor"
PREDICT_PERMISSIONS = ["aiplatform.endpoints.predict"]
PREDICT_FALLBACK_ROLE = "roles/aiplatform.user"


def ensure_server_account(
    config: Config,
    store: StateStore,
    progress: Progress,
    changes: list[Change],
    *,
    always: bool = False,
    target: str = "vertex",
) -> str:
    """The account the model server runs as, when it needs one: it may write the compile cache and read
    gs:// weights (the base's, a refiner's) and LoRA adapters, nothing else. Empty: Vertex AI's own account,
    which may only read the artifacts. `always` (Cloud Run): an account of its own even with no grant, so the
    server never runs as the project's default compute account (an editor of the whole project). `target`: the
    target whose state records the account."""
    email = server_account(config) or (server_email(config) if always else "")
    if not email:
        return ""
    from sdxlctl.gcp.iam import ServiceAccounts
    from sdxlctl.gcp.storage import Storage

    c, n = cloud(config), names(config)
    cache = compile_cache(config)
    wanted = server_grants(config)
    may = "write its compile cache" if cache else "read gs://" if wanted else "do nothing else"
    progress("giving the model server an account that may " + may)
    ServiceAccounts(c).ensure(n.server_account_id, f"sdxlctl model server of {config.name}")
    recorded = store.read().get(config.name, "server-account")
    before = set(recorded.details.get("buckets", [])) if recorded and recorded.name == email else set()
    # Recorded before granting, so that teardown finds every bucket even when this stops halfway.
    store.record(config.name, _account(target, email, before | set(wanted)))
    if cache.startswith("gs://"):
        Storage(c, bucket_of(cache), n.labels).ensure_bucket()
    grants = [_grant_bucket(c, email, bucket, roles, changes) for bucket, roles in sorted(wanted.items())]
    kept = {bucket for bucket in before - set(wanted) if not _revoke_bucket(c, email, bucket, changes)}
    store.record(config.name, _account(target, email, set(wanted) | kept))
    granted = any(done for done, _ in grants)
    said = ", ".join(d for _, d in grants) or "no roles: it reads nothing on gs://"
    changes.append(Change("update" if granted else "keep", "service account", email, said))
    return email


def server_email(config: Config) -> str:
    """The model server's own account, whether target vertex needs it or not (target cloudrun always does)."""
    n = names(config)
    return n.email(n.server_account_id)


def _account(target: str, email: str, buckets: set[str]) -> Resource:
    return Resource(kind="server-account", name=email, target=target, details={"buckets": sorted(buckets)})


def server_grants(config: Config) -> dict[str, dict[str, list[str]]]:
    """bucket -> role -> what the model server's account needs there: "" all of it, "a/b/" a folder, or an
    object's name (a preloaded adapter at the bucket's top)."""
    model, cache = config.model, compile_cache(config)
    wanted: list[tuple[str, str]] = []
    if cache.startswith("gs://"):
        wanted.append((CACHE_ROLE, cache))
    if model.source.startswith("gs://") and not model.bake:  # baked: the image has them
        wanted.append((WEIGHTS_ROLE, model.source))
    if model.refiner.startswith("gs://"):  # never baked: fetched at every start, as its own account
        wanted.append((WEIGHTS_ROLE, model.refiner))
    wanted = [(role, uri.rstrip("/") + "/") for role, uri in wanted]  # folders, whatever their names
    wanted += [(WEIGHTS_ROLE, uri) for uri in lora_reads(config)]  # folders, or an object at a bucket's top
    grants: dict[str, dict[str, list[str]]] = {}
    for role, uri in wanted:
        grants.setdefault(bucket_of(uri), {}).setdefault(role, []).append(_target(uri))
    return {bucket: {role: _narrowest(folders) for role, folders in roles.items()} for bucket, roles in grants.items()}


def _target(uri: str) -> str:
    """A gs:// URI as a grant holds it: "" for a bucket, "a/b/" for a folder (ending in '/'), else an object."""
    return uri.removeprefix("gs://").partition("/")[2].lstrip("/")


def _narrowest(targets: list[str]) -> list[str]:
    """The fewest targets that cover `targets`: the bucket covers everything, a folder what lies under it."""
    if "" in targets:
        return [""]
    unique = sorted(set(targets))
    return [t for t in unique if not any(t.startswith(o) for o in unique if o != t and o.endswith("/"))]


def _said(bucket: str, target: str) -> str:
    return f"gs://{bucket}/{target} only" if target else f"all of gs://{bucket}"


def refiner_detail(config: Config) -> str:
    """How the server gets its refiner, for the deploy plan."""
    detail = "fetched by the server at every start (its UNet only: the VAE and text_encoder_2 are the base's)"
    if config.model.refiner.startswith("gs://"):
        detail += f"; read as the server's own account, with {WEIGHTS_ROLE}"
    if config.model.bake:
        detail += "; [model] bake puts the base's weights in the image, not the refiner's"
    return detail


def server_account_plan(config: Config) -> str:
    """What the deploy plan says the model server's account may do."""
    cache, refiner, loras = compile_cache(config), config.model.refiner, lora_reads(config)
    weights = config.model.source if config.model.source.startswith("gs://") and not config.model.bake else ""
    grants = [f"{CACHE_ROLE} on its compile cache {cache}/ only"] if cache else []
    grants += [f"{WEIGHTS_ROLE} on its weights {weights.rstrip('/')}/ only"] if weights else []  # read by itself
    grants += [f"{WEIGHTS_ROLE} on its refiner {refiner}/ only"] if refiner.startswith("gs://") else []
    grants += [f"{WEIGHTS_ROLE} on its LoRA folders {', '.join(_lora_folders(loras))}"] if loras else []
    if not grants:  # target cloudrun: an account of its own all the same, never the default compute account
        return "the model server's own, with no roles: it reads nothing on gs://"
    uniform = "and bucket-wide where the bucket has no uniform bucket-level access"
    return f"the model server's: {', '.join(grants)}, {uniform}"


def lora_plan(config: Config) -> list[Change]:
    """Where the server gets LoRA adapters from, and with which access, for the deploy plan."""
    rows = []
    for prefix in config.model.lora_sources:
        how = "fetched from the Hub"
        if prefix.startswith("gs://"):
            whole = prefix.count("/") == 3  # gs://BUCKET/
            how = f"read as the server's account, {WEIGHTS_ROLE} " + (
                "on all of the bucket" if whole else "(IAM condition: that folder only)"
            )
        rows.append(Change("read", "LoRA", prefix, f"adapters requests name under it, {how}, at request time"))
    for name, source in config.model.loras.items():
        how = "fetched from the Hub"
        if source.startswith("gs://"):
            bucket, folder = gs_folder(source)
            top = not folder and not source.endswith("/")  # a file at the bucket's top: that object alone
            where = f"{source} only (IAM condition: that object)" if top else _said(bucket, folder and folder + "/")
            how = f"read as the server's account, {WEIGHTS_ROLE} on {where}"
        rows.append(Change("load", "LoRA", f"{name} = {source}", f"{how}, at every start (before it reports ready)"))
    if rows:
        rank = config.model.lora_max_rank
        rows.append(Change("check", "LoRA", f"max rank {rank}", "the rank a request's adapters may add up to"))
    return rows


def _lora_folders(uris: list[str]) -> list[str]:
    """gs:// folders (and objects) as they are granted: one inside another is covered by it; a bucket's top
    is all of it."""
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        by_bucket.setdefault(bucket_of(uri), []).append(_target(uri))
    return [_said(bucket, target) for bucket, targets in by_bucket.items() for target in _narrowest(targets)]


def _grant_bucket(
    c: Cloud, email: str, bucket: str, roles: dict[str, list[str]], changes: list[Change]
) -> tuple[bool, str]:
    """Each role on the objects of its folders (or that object) only, when the bucket lets IAM conditions say
    so; else on the whole bucket, with a warning. Any other role sdxlctl gives the server there goes. Whether the policy
    changed, and what was granted."""
    from sdxlctl.gcp.storage import Storage

    storage = Storage(c, bucket, {})
    folders = [folder for role in roles for folder in roles[role] if folder]
    if folders and not storage.uniform_access():
        changes.append(
            Change(
                "warn",
                "bucket",
                f"gs://{bucket}",
                f"without uniform bucket-level access IAM conditions are refused: {', '.join(roles)} cover every "
                f"object, not only {', '.join(folders)} "
                f"(gcloud storage buckets update gs://{bucket} --uniform-bucket-level-access)",
            )
        )
        roles = {role: [""] for role in roles}
    granted = storage.grant(f"serviceAccount:{email}", {role: roles.get(role, []) for role in SERVER_ROLES})
    said = [f"{role} on {_said(bucket, folder)}" for role, folders in roles.items() for folder in folders]
    return granted, ", ".join(said)


def _revoke_bucket(c: Cloud, email: str, bucket: str, changes: list[Change]) -> bool:
    """The server's roles on a bucket the config no longer names; False (and a warning) when that failed."""
    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.gcp.storage import Storage

    try:
        taken = Storage(c, bucket, {}).revoke(f"serviceAccount:{email}")
    except CloudError as exc:
        changes.append(Change("warn", "bucket", f"gs://{bucket}", f"the config no longer names it, but {exc.message}"))
        return False
    if taken:
        changes.append(Change("update", "bucket", f"gs://{bucket}", "the model server's roles taken away: unused now"))
    return True


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
        recorded = store.read().get(config.name, "server-account")
        granted = set(recorded.details.get("buckets", [])) if recorded and recorded.name == email else set()
        for bucket in sorted(server_buckets(config) | granted):
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
