"""The errors a newcomer meets first are one line each, say what to do, and come fast (no Hub retries)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import intervene as iv
from intervene.assets import DEMO_MODEL_DIR
from intervene.cli import main
from intervene.command import error_message
from tests.hub_server import patch_hub_client
from tests.tiny_models import tiny_model


@pytest.fixture
def diff(tmp_path: Path) -> Path:
    model = tiny_model("llama")
    iv.Intervenable(model, iv.Steering({"layers.1": torch.ones(32)}), attach=False).save_pretrained(tmp_path / "d")
    return tmp_path / "d"


@pytest.fixture
def dead_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A Hub endpoint nothing listens on: every request fails to connect at once, as offline."""
    patch_hub_client(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf_home")


def _one_line(capsys: pytest.CaptureFixture[str], prefix: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"{prefix}: error: "), err
    return err


def test_push_checks_the_path_then_the_token_before_any_request(diff: Path, capsys, monkeypatch, dead_hub) -> None:
    assert main(["push", "runs/nonexistent", "user/x"]) == 1
    assert "no such diff directory: runs/nonexistent" in _one_line(capsys, "intervene push")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["push", str(diff), "user/x"]) == 1
    line = _one_line(capsys, "intervene push")
    assert "needs a Hugging Face Hub token" in line and "hf auth login" in line


def test_push_without_network_is_one_line(diff: Path, capsys, dead_hub) -> None:
    start = time.perf_counter()
    assert main(["push", str(diff), "user/x"]) == 1  # a token is set: the connection itself fails
    line = _one_line(capsys, "intervene push")
    assert "could not reach the Hugging Face Hub" in line and "HF_HUB_OFFLINE" in line
    assert time.perf_counter() - start < 60


def test_a_missing_diff_is_no_such_directory_before_the_model_loads(capsys, dead_hub, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("./no-such-diff", "runs/nonexistent", "no-such-diff"):
        start = time.perf_counter()
        assert main(["bake", "demo", name, "--out", "never"]) == 1
        line = _one_line(capsys, "intervene bake")
        assert f"no such diff directory: {name}" in line, line
        assert time.perf_counter() - start < 30  # one failed connection at most, no retries
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    assert main(["bake", "demo", "runs/nonexistent", "--out", "never"]) == 1
    assert "HF_HUB_OFFLINE is set" in _one_line(capsys, "intervene bake")
    assert not Path("never").exists()


def test_bake_push_checks_the_token_first(diff: Path, capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    capsys.readouterr()  # the save's own progress bar
    assert main(["bake", str(tmp_path / "base"), str(diff), "--out", str(tmp_path / "o"), "--push", "u/r"]) == 1
    assert "needs a Hugging Face Hub token" in _one_line(capsys, "intervene bake")
    assert not (tmp_path / "o").exists()  # nothing baked before the check


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")
def test_a_missing_model_is_one_line_without_retries(capsys, dead_hub) -> None:
    for name in ("./no-such-model", "no-such-model"):
        start = time.perf_counter()
        assert main(["elicit", name, "quirky:addition", "--no-progress"]) == 1
        line = _one_line(capsys, "intervene elicit")
        assert f"no such model directory: {name}" in line and "'demo'" in line, line
        assert time.perf_counter() - start < 30  # was 52 s of retries offline


def test_other_missing_folders_are_named(capsys, tmp_path: Path) -> None:
    assert main(["plot", str(tmp_path / "runs" / "nonexistent")]) == 1
    assert "no such run directory" in _one_line(capsys, "intervene plot")
    assert main(["features", "report", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    assert "no such cache directory" in _one_line(capsys, "intervene features report")


def test_error_messages_of_the_http_stack_become_one_line() -> None:
    connect = type("ConnectError", (Exception,), {"__module__": "httpx2"})
    assert error_message(connect("[Errno -2] Name or service not known")).startswith(
        "could not reach the Hugging Face Hub (ConnectError: [Errno -2]")
    http = type("HfHubHTTPError", (OSError,), {"__module__": "huggingface_hub.errors"})
    e = http("401 Client Error\n\nUnauthorized")
    e.response = type("R", (), {"status_code": 401, "url": "https://hub/x"})()
    assert "HTTP 401" in error_message(e) and "hf auth login" in error_message(e)
    assert error_message(ValueError("a\n  b")) == "a b"  # multi-line messages are joined
    assert error_message(KeyError("bug")) is None  # a bug keeps its traceback
