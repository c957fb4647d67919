"""Probe persistence: exact JSON + safetensors round trips; corrupt files raise ProbeFormatError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from intervene import probes
from intervene.probes.synthetic import planted_features, planted_pairs


def _fitted(kind: str, batch: tuple[int, ...] = ()) -> tuple[probes.Probe, tuple[torch.Tensor, ...]]:
    if kind in ("ccs", "crc"):
        xp, xn, y, _ = planted_pairs(120, 6, batch=batch, seed=1)
        probe = probes.CCSProbe(n_restarts=2) if kind == "ccs" else probes.CRCProbe(method="pca")
        return probe.fit(xp, xn).calibrate(xp, xn, y), (xp, xn)
    x, y, _ = planted_features(120, 6, batch=batch, seed=1)
    probe = {
        "lr": probes.LogisticRegressionProbe(Cs=[0.1, 1.0], cv=3),
        "mean_diff": probes.MeanDiffProbe(),
        "lda": probes.LDAProbe(shrinkage=0.1),
    }[kind]
    return probe.fit(x, y), (x,)


@pytest.mark.parametrize("kind", ["lr", "mean_diff", "lda", "ccs", "crc"])
@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_round_trip_is_exact(tmp_path: Path, kind: str, batch: tuple[int, ...]) -> None:
    probe, xs = _fitted(kind, batch)
    probe.save(tmp_path / "p")
    loaded = probes.load_probe(tmp_path / "p")
    assert type(loaded) is type(probe)
    assert loaded.get_params() == {
        k: list(v) if isinstance(v, tuple) else v for k, v in probe.get_params().items()
    }
    for name, tensor in probe._learned_tensors().items():
        torch.testing.assert_close(getattr(loaded, name), tensor, rtol=0, atol=0)
    torch.testing.assert_close(loaded.decision_function(*xs), probe.decision_function(*xs), rtol=0, atol=0)
    torch.testing.assert_close(loaded.direction_, probe.direction_, rtol=0, atol=0)
    if batch:
        torch.testing.assert_close(loaded[1, 2].direction_, probe[1, 2].direction_, rtol=0, atol=0)
    # The typed classmethod works too, and refuses another probe type.
    assert isinstance(type(probe).load(tmp_path / "p"), type(probe))
    other = probes.MeanDiffProbe if kind != "mean_diff" else probes.LDAProbe
    with pytest.raises(probes.ProbeFormatError):
        other.load(tmp_path / "p")


def test_file_stem_paths(tmp_path: Path) -> None:
    probe, (x,) = _fitted("mean_diff")
    written = probe.save(tmp_path / "sub" / "my_probe.json")
    assert written == tmp_path / "sub" / "my_probe.json"
    assert (tmp_path / "sub" / "my_probe.safetensors").exists()
    loaded = probes.load_probe(tmp_path / "sub" / "my_probe.safetensors")
    torch.testing.assert_close(loaded.coef_, probe.coef_, rtol=0, atol=0)
    config = json.loads(written.read_text())
    assert config["type"] == "mean_diff" and config["format"] == "intervene.probe"


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    probe, _ = _fitted("lr")
    probe.save(tmp_path / "p")
    return tmp_path / "p"


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "probe.json").read_text())
    edit(config)
    (path / "probe.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.update(type="os.system"),  # never imported by name: unknown type
        lambda c: c.update(format="something-else"),
        lambda c: c.update(format_version=99),
        lambda c: c["params"].update(not_a_param=1),
        lambda c: c["params"].update(C="x", Cs=None) or c.pop("batch_shape"),
        lambda c: c["tensors"]["coef_"].update(shape=[7]),
        lambda c: c["tensors"].pop("C_"),
        lambda c: c.update(batch_shape=[3]),
        lambda c: c.update(params=[]),
    ],
)
def test_inconsistent_config_raises(saved: Path, edit) -> None:
    _edit_config(saved, edit)
    with pytest.raises(probes.ProbeFormatError):
        probes.load_probe(saved)


def test_corrupt_or_truncated_files_raise(saved: Path) -> None:
    tensors = (saved / "probe.safetensors").read_bytes()
    config = (saved / "probe.json").read_text()
    (saved / "probe.json").write_text(config[: len(config) // 2])
    with pytest.raises(probes.ProbeFormatError):
        probes.load_probe(saved)
    (saved / "probe.json").write_text(config)
    for broken in (tensors[: len(tensors) // 2], tensors[:5], b"\xff" * 64, b""):
        (saved / "probe.safetensors").write_bytes(broken)
        with pytest.raises(probes.ProbeFormatError):
            probes.load_probe(saved)
    (saved / "probe.safetensors").unlink()
    with pytest.raises(probes.ProbeFormatError):
        probes.load_probe(saved)
    with pytest.raises(FileNotFoundError):
        probes.load_probe(saved.parent / "nothing-here")


def test_tensor_file_with_wrong_contents_raises(saved: Path) -> None:
    from safetensors.torch import save_file

    save_file({"coef_": torch.zeros(6), "intercept_": torch.zeros(())}, str(saved / "probe.safetensors"))
    with pytest.raises(probes.ProbeFormatError):  # C_ missing
        probes.load_probe(saved)
    save_file(
        {"coef_": torch.zeros(5), "intercept_": torch.zeros(()), "C_": torch.ones(())},
        str(saved / "probe.safetensors"),
    )
    with pytest.raises(probes.ProbeFormatError):  # shape disagrees with the config
        probes.load_probe(saved)


def test_registry_of_probe_types() -> None:
    registered = probes.registered_probes()
    assert {"logistic_regression", "mean_diff", "lda", "ccs", "crc"} <= set(registered)
    assert probes.lookup_probe("ccs") is probes.CCSProbe
    with pytest.raises(ValueError):
        probes.register_probe("ccs")(type("Other", (probes.Probe,), {}))
    with pytest.raises(probes.ProbeFormatError):
        probes.lookup_probe("intervene.probes.ccs.CCSProbe")
