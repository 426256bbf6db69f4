"""Step results as data: what `--json` prints on stdout for build, upload, deploy, ui-deploy and teardown."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sdxlctl.steps import Change, DeployResult, Notice, Outcome, Removal, StepResult, TornDown


def change(row: Change) -> dict[str, str]:
    return {"action": row.action, "kind": row.kind, "name": row.name, "detail": row.detail}


def outcome(
    step: str, result: Outcome | Removal, *, dry_run: bool, cost: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One JSON object per step: its changes (the plan of a dry run), its result, and, for a deploy, its cost."""
    data: dict[str, Any] = {"step": step, "dry_run": dry_run}
    if isinstance(result, StepResult):
        data |= {
            "changes": [change(row) for row in result.changes],
            "result": result.result,
            "failed": result.failed,
        }
        if not result.dry_run:
            data["seconds"] = round(result.seconds, 3)
    elif isinstance(result, Removal):  # teardown's plan: processes to stop, cloud resources to delete
        data |= {
            "stop": [{"kind": r.kind, "name": r.name, "url": r.url} for r in result.resources],
            "changes": [change(row) for row in result.changes],
        }
    elif isinstance(result, DeployResult):
        resource = result.resource
        data |= {
            "action": result.action,
            "what": result.what,
            "result": resource.url,
            "pid": resource.details.get("pid"),
            "seconds": round(result.seconds, 3),
        }
    elif isinstance(result, TornDown):
        data |= {"outcomes": [asdict(o) for o in result.outcomes]}
    elif isinstance(result, Notice):  # a step with nothing to do here (or the local target's plan)
        data |= {"message": result.message, "changes": []}
    if cost is not None:
        data["cost"] = cost
    return data
