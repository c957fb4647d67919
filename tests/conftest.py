"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.hub_server import HubServer, patch_hub_client

# Tiny models run fastest on one thread, and CI has two cores; results do not depend on it.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path) -> HubServer:
    """A fresh loopback Hub that ``huggingface_hub`` / ``transformers`` talk to (never the internet),
    with a private cache and a fake token. Returns the server (``.url``, ``.commits``, ``.files()``)."""
    hub_server.reset()
    patch_hub_client(monkeypatch, hub_server.url, tmp_path / "hf_home")
    return hub_server
