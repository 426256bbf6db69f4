"""[cloudrun] at load: what target cloudrun reads is checked, what only target vertex reads is not refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxlctl.config import load_config
from sdxlctl.errors import ConfigError


def _config(tmp_path: Path, text: str, **environ: str) -> object:
    path = tmp_path / "sdxlctl.toml"
    path.write_text('target = "cloudrun"\n[gcp]\nproject = "p"\nregion = "us-central1"\n' + text)
    return load_config(path, environ)


@pytest.mark.parametrize(
    "environ",
    [{"SDXLCTL_DEPLOY_MIN_REPLICAS": "2"}, {"SDXLCTL_DEPLOY_MIN_REPLICAS": "0"}],
    ids=["above-max", "zero-on-a-shared-endpoint"],
)
def test_the_vertex_replica_keys_are_not_refused_on_cloudrun(tmp_path: Path, environ: dict[str, str]) -> None:
    """Cloud Run sizes itself from [cloudrun]: [deploy] min/max_replicas are Vertex AI's and unread here."""
    _config(tmp_path, "", **environ)
    with pytest.raises(ConfigError, match="min_replicas"):  # still refused where they are read
        _config(tmp_path, "", SDXLCTL_TARGET="vertex", **environ)


def test_cloudruns_own_instances_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cloudrun\.min_instances \(3\) is above cloudrun\.max_instances \(2\)"):
        _config(tmp_path, "[cloudrun]\nmin_instances = 3\nmax_instances = 2\n")
