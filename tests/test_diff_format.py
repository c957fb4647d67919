"""The diff format: exact round trips, and named errors for every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import intervene as iv
from intervene.diff_format import CONFIG_NAME, WEIGHTS_NAME
from intervene.hooks import count_hooks
from tests.test_positions import left_pad
from tests.tiny_models import tiny_model

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15]]


def _ivm(model) -> iv.Intervenable:
    g = torch.Generator().manual_seed(0)
    heads = iv.resolve_site(model, "layers.1.heads").heads
    return iv.Intervenable(model, [
        iv.Steering({"layers.0": torch.randn(32, generator=g), "layers.1.heads": torch.randn(*heads, generator=g)},
                    scale=2.0, positions="generated", name="steer"),
        iv.DirectionalAblation(torch.randn(32, generator=g), sites="layers.*", value=0.5, positions=[[0, -1], [2]],
                               name="ablate"),
    ])


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "falcon"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype)
    batch = left_pad(PROMPTS)
    ivm = _ivm(model)
    ivm.metadata = {"fitted_on": "unit test"}
    want = ivm.generate(**batch, max_new_tokens=5, do_sample=False)
    want_logits = ivm(**batch).logits
    ivm.save_pretrained(tmp_path)
    ivm.detach()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    loaded = iv.Intervenable.load(tmp_path, model)
    assert loaded.metadata == {"fitted_on": "unit test"}
    assert [type(i) for i in loaded.interventions] == [iv.Steering, iv.DirectionalAblation]
    assert torch.equal(loaded(**batch).logits, want_logits)
    assert torch.equal(loaded.generate(**batch, max_new_tokens=5, do_sample=False), want)
    loaded.detach()


def test_config_contents(tmp_path: Path) -> None:
    model = tiny_model("llama_gqa")
    ivm = _ivm(model)
    ivm.save_pretrained(tmp_path)
    ivm.detach()
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 2 and cfg["library"] == "intervene"  # 2: the weights' checksum
    import hashlib

    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    assert cfg["weights"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert {"library_version", "transformers_version"} <= set(cfg)
    fp = cfg["base_model"]
    assert fp["model_type"] == "llama" and fp["num_key_value_heads"] == 2 and fp["head_dim"] == 8
    assert fp["name_or_path"] == "tiny-llama_gqa"
    e0, e1 = cfg["interventions"]
    assert e0 == {"type": "steering", "name": "steer", "sites": ["layers.0", "layers.1.heads"],
                  "positions": "generated", "params": {"scale": 2.0}}
    assert e1["positions"] == {"per_example": [[0, -1], [2]]} and e1["sites"] == ["layers.*"]
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(tensors) == {"steer.vector:layers.0", "steer.vector:layers.1.heads", "ablate.direction:layers.*"}
    assert tensors["steer.vector:layers.1.heads"].shape == (4, 8)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: intervene") and "Intervenable.load" in card


def _saved(tmp_path: Path, family: str = "llama") -> tuple[Path, torch.nn.Module]:
    model = tiny_model(family)
    ivm = _ivm(model)
    ivm.save_pretrained(tmp_path)
    ivm.detach()
    return tmp_path, model


@pytest.mark.parametrize("other", ["llama_gqa", "gpt2", "gemma"])
def test_wrong_model_raises_incompatible_before_touching_it(tmp_path: Path, other: str) -> None:
    d, _ = _saved(tmp_path)
    target = tiny_model(other)
    before = count_hooks(target)
    with pytest.raises(iv.IncompatibleModelError) as e:
        iv.Intervenable.load(d, target)
    assert "expects" in str(e.value) and "model has" in str(e.value)
    assert count_hooks(target) == before


def test_tensor_shape_mismatch_is_incompatible(tmp_path: Path) -> None:
    d, model = _saved(tmp_path)
    t = load_file(str(d / WEIGHTS_NAME))
    t["steer.vector:layers.0"] = torch.randn(31)
    save_file(t, str(d / WEIGHTS_NAME))
    with pytest.raises(iv.IncompatibleModelError, match="shape"):
        iv.Intervenable.load(d, model)


def test_unknown_site_on_this_model_is_incompatible(tmp_path: Path) -> None:
    d, model = _saved(tmp_path)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["interventions"][0]["sites"] = ["layers.0", "layers.1.heads"]
    cfg["base_model"]["num_hidden_layers"] = None
    cfg["interventions"][0]["sites"][0] = "layers.5"
    t = load_file(str(d / WEIGHTS_NAME))
    t["steer.vector:layers.5"] = t.pop("steer.vector:layers.0")
    save_file(t, str(d / WEIGHTS_NAME))
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(iv.IncompatibleModelError, match="layers.5"):
        iv.Intervenable.load(d, model)


@pytest.mark.parametrize("corrupt", ["truncate_json", "garbage_json", "truncate_weights", "garbage_weights",
                                     "missing_weights", "missing_config", "unknown_type", "future_version",
                                     "missing_tensor", "extra_tensor", "bad_positions"])
def test_corrupt_diffs_raise_diff_format_error(tmp_path: Path, corrupt: str) -> None:
    d, model = _saved(tmp_path)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    cfg = json.loads(cfg_path.read_text())
    if corrupt == "truncate_json":
        cfg_path.write_text(cfg_path.read_text()[:40])
    elif corrupt == "garbage_json":
        cfg_path.write_bytes(b"\x80\x81 not json")
    elif corrupt == "truncate_weights":
        w_path.write_bytes(w_path.read_bytes()[:-10])
    elif corrupt == "garbage_weights":
        w_path.write_bytes(b"\xff" * 64)
    elif corrupt == "missing_weights":
        w_path.unlink()
    elif corrupt == "missing_config":
        cfg_path.unlink()
    elif corrupt == "unknown_type":
        cfg["interventions"][0]["type"] = "os.system"
        cfg_path.write_text(json.dumps(cfg))
    elif corrupt == "future_version":
        cfg["format_version"] = 99
        cfg_path.write_text(json.dumps(cfg))
    elif corrupt == "missing_tensor":
        t = load_file(str(w_path))
        del t["steer.vector:layers.0"]
        save_file(t, str(w_path))
    elif corrupt == "extra_tensor":
        t = load_file(str(w_path))
        t["stowaway.x"] = torch.zeros(1)
        save_file(t, str(w_path))
    elif corrupt == "bad_positions":
        cfg["interventions"][0]["positions"] = "sometimes"
        cfg_path.write_text(json.dumps(cfg))
    before = count_hooks(model)
    with pytest.raises(iv.DiffFormatError):
        iv.Intervenable.load(d, model)
    assert count_hooks(model) == before


def test_missing_directory_and_file_path(tmp_path: Path) -> None:
    model = tiny_model("llama")
    with pytest.raises(iv.DiffNotFoundError):
        iv.Intervenable.load(tmp_path / "nope" / "deeper" / "still", model)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(iv.DiffFormatError):
        iv.Intervenable.load(f, model)


def test_loading_never_unpickles(tmp_path: Path, monkeypatch) -> None:
    import pickle

    def refuse(*a, **k):
        raise AssertionError("unpickling during load")

    d, model = _saved(tmp_path)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    iv.Intervenable.load(d, model).detach()


def test_saved_tensors_are_contiguous_and_dealiased(tmp_path: Path) -> None:
    model = tiny_model("llama")
    base = torch.randn(2, 32)
    s = iv.Steering({"layers.0": base[0], "layers.1": base[:, 0:32][1]})
    iv.Intervenable(model, s, attach=False).save_pretrained(tmp_path)
    t = load_file(str(tmp_path / WEIGHTS_NAME))
    assert torch.equal(t["steering.vector:layers.0"], base[0]) and t["steering.vector:layers.1"].is_contiguous()


def test_custom_registered_type_round_trips(tmp_path: Path) -> None:
    from intervene.intervention import Intervention
    from intervene.registry import register

    @register("test_scale_residual")
    class ScaleResidual(Intervention):
        def __init__(self, factor, sites="layers.0", positions="all", name=None):
            super().__init__(sites, positions, name)
            self.factor = factor

        def apply(self, site, h, ctx):
            return h * self.factor

        def params(self):
            return {"factor": self.factor}

        @classmethod
        def from_saved(cls, sites, positions, name, params, tensors):
            return cls(params["factor"], sites, positions, name)

    model = tiny_model("llama")
    batch = left_pad(PROMPTS)
    with iv.Intervenable(model, ScaleResidual(1.5)) as ivm:
        want = ivm(**batch).logits
        ivm.save_pretrained(tmp_path)
    with iv.Intervenable.load(tmp_path, model) as ivm:
        assert torch.equal(ivm(**batch).logits, want)
