"""The one table from `--gpu` to what Vertex AI deploys: machine type, accelerator and its count."""

from __future__ import annotations

from dataclasses import dataclass

from sdxlctl.errors import UsageError


@dataclass(frozen=True)
class GpuOption:
    """A `--gpu` choice and the machine it means on Vertex AI online prediction."""

    key: str
    label: str
    machine_type: str
    accelerator: str  # Vertex AI AcceleratorType enum name
    count: int
    vcpus: int
    ram_gb: float
    family: str  # price family: the machine series whose vCPU and RAM prices apply
    memory_gb: float  # of one GPU, as NVIDIA states it (GB): what one model server may fill
    quota: str  # Vertex AI's serving quota of this GPU per region: aiplatform.googleapis.com/<quota>
    sku: str  # its Cloud Billing SKU, a pattern of the description after "Vertex AI: Online/Batch Prediction "
    note: str = ""


GPUS: dict[str, GpuOption] = {
    option.key: option
    for option in (
        GpuOption(
            "t4",
            "NVIDIA T4 16GB",
            "n1-standard-8",
            "NVIDIA_TESLA_T4",
            1,
            8,
            30,
            "n1",
            memory_gb=16,
            quota="custom_model_serving_nvidia_t4_gpus",
            sku=r"nvidia tesla t4 gpu",
        ),
        GpuOption(
            "l4",
            "NVIDIA L4 24GB",
            "g2-standard-8",
            "NVIDIA_L4",
            1,
            8,
            32,
            "g2",
            memory_gb=24,
            quota="custom_model_serving_nvidia_l4_gpus",
            sku=r"nvidia l4 gpu",
        ),
        GpuOption(
            "a100",
            "NVIDIA A100 40GB",
            "a2-highgpu-1g",
            "NVIDIA_TESLA_A100",
            1,
            12,
            85,
            "a2",
            memory_gb=40,
            quota="custom_model_serving_nvidia_a100_gpus",
            sku=r"nvidia tesla a100 gpu",
        ),
        GpuOption(
            "a100-80",
            "NVIDIA A100 80GB",
            "a2-ultragpu-1g",
            "NVIDIA_A100_80GB",
            1,
            12,
            170,
            "a2",
            memory_gb=80,
            quota="custom_model_serving_nvidia_a100_80gb_gpus",
            sku=r"nvidia a100 80gb gpu",
        ),
        GpuOption(
            "h100",
            "NVIDIA H100 80GB",
            "a3-highgpu-1g",
            "NVIDIA_H100_80GB",
            1,
            26,
            234,
            "a3",
            memory_gb=80,
            quota="custom_model_serving_nvidia_h100_gpus",
            sku=r"nvidia h100 80gb gpu",
        ),
        GpuOption(
            "h200",
            "NVIDIA H200 141GB",
            "a3-ultragpu-8g",
            "NVIDIA_H200_141GB",
            8,
            224,
            2952,
            "a3",
            memory_gb=141,
            quota="custom_model_serving_nvidia_h200_gpus",
            sku=r"nvidia h200(?: 141gb)? gpu",
            note="H200 comes only as 8 GPUs per machine; one model server uses one of them",
        ),
    )
}


def gpu(key: str) -> GpuOption:
    """The option for `--gpu key`, or a UsageError listing the choices."""
    try:
        return GPUS[key]
    except KeyError:
        raise UsageError(f"unknown GPU {key!r}", hint=f"choose one of {', '.join(GPUS)}") from None


@dataclass(frozen=True)
class CloudRunGpu:
    """The GPU target cloudrun offers: Cloud Run services (Run Admin API v2) take one NVIDIA L4 per instance.

    Facts from ../shared/CLOUD-RUN-GPU-FACTS.md: at least 4 vCPUs and 16 GiB beside it, CPU always allocated
    (`cpuIdle: false`), in the regions below only (asia-south1 by invitation). The other GPUs are Vertex AI's.
    """

    key: str = "l4"  # the --gpu / [deploy] gpu key it is
    accelerator: str = "nvidia-l4"  # template.nodeSelector.accelerator
    min_cpu: int = 4
    min_memory_gib: int = 16
    regions: tuple[str, ...] = (
        "asia-southeast1",
        "asia-south1",
        "europe-west1",
        "europe-west4",
        "us-central1",
        "us-east4",
    )
    quota_page: str = "https://console.cloud.google.com/iam-admin/quotas?service=run.googleapis.com"

    @staticmethod
    def quota(zonal_redundancy: bool) -> str:
        """The quota's name in the console: one with zonal redundancy, one without."""
        kind = "with" if zonal_redundancy else "without"
        return f"Total Nvidia L4 GPU allocation {kind} zonal redundancy, per project per region"

    @staticmethod
    def quota_id(zonal_redundancy: bool) -> str:
        """The quota's id (Cloud Quotas API, service run.googleapis.com)."""
        return (
            "NvidiaL4GpuAllocPerProjectRegion"
            if zonal_redundancy
            else "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion"
        )

    def gpu_problem(self, gpu_key: str) -> str | None:
        """Why `gpu_key` cannot run on Cloud Run (None: it can)."""
        if gpu_key == self.key:
            return None
        return f"Cloud Run offers only the NVIDIA L4 ({self.key}); {gpu_key} is offered by target vertex"

    def region_problem(self, region: str) -> str | None:
        """Why Cloud Run has no L4 in `region` (None: it has)."""
        if region in self.regions:
            return None
        return f"Cloud Run has no L4 GPUs in {region}: choose one of {', '.join(self.regions)}"


CLOUD_RUN_GPU = CloudRunGpu()
