"""Target vertex's teardown deletes only this deployment's own service accounts, whatever the state or a labelled
resource names: another account of the project (the default compute one) is never its to delete."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def test_teardown_takes_only_this_deployments_own_accounts(tmp_path: Path, emulator: Any) -> None:
    from sdxlctl.config import load_config
    from sdxlctl.state import Resource, StateStore
    from sdxlctl.vertex.inventory import inventory
    from sdxlctl.vertex.names import names

    path = tmp_path / "sdxlctl.toml"
    path.write_text('target = "vertex"\n')
    env = emulator.env()
    config = load_config(path, {k: v for k, v in env.items() if k.startswith("SDXLCTL_")})
    store = StateStore(tmp_path / ".sdxlctl")
    victim = "123-compute@developer.gserviceaccount.com"
    own = names(config).email(names(config).server_account_id)
    store.record(config.name, Resource(kind="ui-account", name=victim, target="vertex"))
    store.record(config.name, Resource(kind="server-account", name=own, target="vertex"))
    assert inventory(config, store, images=False).accounts == [own]
