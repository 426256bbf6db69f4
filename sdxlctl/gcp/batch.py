"""Vertex AI batch prediction jobs through the JobService GAPIC clients (v1; v1beta1 for Spot).

Jobs travel as the REST API's own JSON (camelCase, int64 counts as strings), in and out: the body sdxlctl
builds is the one Google documents, and the layers above never touch a protobuf.
"""

from __future__ import annotations

from typing import Any

from sdxlctl.gcp.errors import CloudError, translated
from sdxlctl.gcp.session import Cloud, Progress, create_once, is_transient, wait_for
from sdxlctl.steps import quiet

# Where a job no longer runs: cancel has nothing to stop, delete may go ahead
FINISHED = frozenset(
    {
        "JOB_STATE_SUCCEEDED",
        "JOB_STATE_FAILED",
        "JOB_STATE_CANCELLED",
        "JOB_STATE_PARTIALLY_SUCCEEDED",
        "JOB_STATE_EXPIRED",
    }
)

MAYBE_CREATED = "a job may have been created: `sdxlctl status` shows it, `sdxlctl teardown` cancels it"


def label_filter(labels: dict[str, str]) -> str:
    """An AIP-160 list filter matching every one of `labels`."""
    return " AND ".join(f"labels.{key}={value}" for key, value in sorted(labels.items()))


class Jobs:
    """BatchPredictionJobs in one project and region."""

    def __init__(self, cloud: Cloud) -> None:
        from google.cloud import aiplatform_v1

        self.cloud = cloud
        self.host = f"{cloud.region}-aiplatform.googleapis.com"
        self.client: Any = cloud.client(aiplatform_v1.JobServiceClient, self.host)

    def _call(self, action: str) -> Any:
        return translated(action, api="aiplatform", project=self.cloud.project, region=self.cloud.region)

    def create(
        self, body: dict[str, Any], *, find_labels: dict[str, str], progress: Progress = quiet
    ) -> dict[str, Any]:
        """Create the job `body` describes, once: after a lost answer the job carrying `find_labels` (the
        job's own sdxlctl-batch stamp) is looked for before anything is sent again (see `create_once`).

        Spot replicas (dedicatedResources.spot) exist only in v1beta1: such a job goes through that client.
        """
        from google.protobuf import json_format

        spot = bool(body.get("dedicatedResources", {}).get("spot"))
        if spot:
            from google.cloud import aiplatform_v1beta1 as aip
        else:
            from google.cloud import aiplatform_v1 as aip
        client = self.cloud.client(aip.JobServiceClient, self.host) if spot else self.client
        job = aip.BatchPredictionJob()
        json_format.ParseDict(body, job._pb, ignore_unknown_fields=False)

        def send() -> dict[str, Any]:
            created = client.create_batch_prediction_job(parent=self.cloud.parent, batch_prediction_job=job, retry=None)
            return _plain(created)

        def find() -> dict[str, Any] | None:
            found = self.find(find_labels)
            return found[0] if found else None

        try:
            return create_once(
                send,
                find,
                what="create the batch prediction job",
                cloud=self.cloud,
                api="aiplatform",
                progress=progress,
            )
        except CloudError as exc:
            # given up after answers that were lost: the server may have made the job all the same (and it bills)
            cause = exc.__context__  # translated() raises `from None`: the Google error is the context
            if not isinstance(cause, Exception) or not is_transient(cause):
                raise
            exc.hint = f"{MAYBE_CREATED}; {exc.hint}" if exc.hint else MAYBE_CREATED
            raise

    def get(self, name: str) -> dict[str, Any]:
        with self._call(f"get batch prediction job {name}"):
            return _plain(self.client.get_batch_prediction_job(name=name, retry=self.cloud.retry()))

    def find(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Every job carrying all of `labels`, newest first."""
        with self._call("list batch prediction jobs"):
            request = {"parent": self.cloud.parent, "filter": label_filter(labels)}
            jobs = [
                _plain(job) for job in self.client.list_batch_prediction_jobs(request=request, retry=self.cloud.retry())
            ]
        return sorted(jobs, key=lambda job: str(job.get("createTime", "")), reverse=True)

    def cancel(self, name: str) -> None:
        """Ask the job to stop (asynchronous: it goes through CANCELLING to CANCELLED)."""
        with self._call(f"cancel batch prediction job {name}"):
            self.client.cancel_batch_prediction_job(name=name, retry=self.cloud.retry())

    def delete(self, name: str, *, timeout_s: float, progress: Progress = quiet) -> None:
        """Delete a finished job's record (its output files stay) and wait for the operation."""
        with self._call(f"delete batch prediction job {name}"):
            operation = self.client.delete_batch_prediction_job(name=name, retry=self.cloud.retry())
        wait_for(
            self.client,
            str(operation.operation.name),
            what="delete the batch prediction job",
            timeout_s=timeout_s,
            progress=progress,
            api="aiplatform",
            cloud=self.cloud,
        )


def _plain(job: Any) -> dict[str, Any]:
    """A job as the REST API's JSON."""
    from google.protobuf import json_format

    return dict(json_format.MessageToDict(job._pb))
