"""Identity: ID tokens as Google's OAuth token endpoint and Cloud Run's metadata server give them.
STUB: helper emulator-identity replaces it (the signatures are the contract)."""

from __future__ import annotations

from pathlib import Path

from tests.emulator.core import Route, World


class Identity:
    def __init__(self, world: World) -> None:
        self.world = world

    def routes(self) -> list[Route]:
        return []


def issue(world: World, email: str, audience: str, lifetime_s: int = 3600) -> str:
    """An ID token for `email` with audience `audience`, signed by the emulator."""
    raise NotImplementedError


def verify(world: World, token: str, audience: str) -> str:
    """The email of a valid, unexpired ID token for `audience`; ApiError(401) otherwise."""
    raise NotImplementedError


def write_key_file(path: Path, email: str, token_uri: str) -> Path:
    """A service account key file google-auth accepts, whose ID tokens come from `token_uri`."""
    raise NotImplementedError


def metadata_host(emulator_url: str, service_name: str) -> str:
    """GCE_METADATA_HOST (and GCE_METADATA_IP) for a process the emulator runs as Cloud Run service `service_name`."""
    raise NotImplementedError
