"""Shared pytest fixtures."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path

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


DemoRun = tuple[Path, str, str]  # (output folder, stdout, stderr)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., DemoRun]:
    """``demo_run(task, *options)``: ``intervene demo --task TASK --no-progress OPTIONS`` at its defaults (the
    setting the README reports), run once per session and shared by every test that reads it."""
    from intervene.cli import main

    runs: dict[tuple[str, ...], DemoRun] = {}

    def run(task: str = "addition", *options: str) -> DemoRun:
        key = (task, *options)
        if key not in runs:
            out = tmp_path_factory.mktemp("demo") / "out"
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                assert main(["demo", "--task", task, "--no-progress", "--out", str(out), *options]) == 0
            runs[key] = (out, stdout.getvalue(), stderr.getvalue())
        return runs[key]

    return run
