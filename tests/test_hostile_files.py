"""The cases of issue #20, one by one: every bad file is a named error that names the file and field,
before anything touches the model; reads stay inside the given directory; nothing blocks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import intervene as iv
from intervene.diff_format import CONFIG_NAME, WEIGHTS_NAME
from intervene.errors import (
    ActivationCacheError,
    DiffFormatError,
    IncompatibleModelError,
    InteropError,
    InterveneFileError,
    LatentCacheError,
    ProbeFormatError,
    SAEFormatError,
    UncheckedFileWarning,
)
from intervene.hooks import count_hooks
from intervene.safeio import Root, parse_json
from tests.tiny_models import tiny_model


def _diff(tmp_path: Path, *ivs: iv.Intervention) -> tuple[Path, torch.nn.Module]:
    model = tiny_model("llama")
    iv.Intervenable(model, list(ivs), attach=False).save_pretrained(tmp_path / "d")
    return tmp_path / "d", model


def _edit(d: Path, fn) -> None:
    cfg = json.loads((d / CONFIG_NAME).read_text())
    fn(cfg)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def _rewrite_weights(d: Path, fn) -> None:
    """Edit the tensors and record the new checksum, as a hostile author would."""
    import hashlib

    t = load_file(str(d / WEIGHTS_NAME))
    fn(t)
    save_file(t, str(d / WEIGHTS_NAME))
    data = (d / WEIGHTS_NAME).read_bytes()
    _edit(d, lambda c: c.update(weights={"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))


def _refused(d: Path, model, err=DiffFormatError, match: str | None = None) -> InterveneFileError:
    before = count_hooks(model)
    with pytest.raises(err, match=match) as e:
        iv.Intervenable.load(d, model)
    assert count_hooks(model) == before and "\n" not in str(e.value)
    return e.value


def v32(seed: int = 0) -> torch.Tensor:
    return torch.randn(32, generator=torch.Generator().manual_seed(seed))


# ---- the diff ------------------------------------------------------------------------------------
def test_bit_flip_in_the_weights_is_a_checksum_error_naming_the_file(tmp_path: Path) -> None:
    d, model = _diff(tmp_path, iv.Steering({"layers.1": v32()}))
    data = bytearray((d / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x10
    (d / WEIGHTS_NAME).write_bytes(bytes(data))
    err = _refused(d, model, match="sha256")
    assert err.path.endswith(WEIGHTS_NAME)
    assert "sha256" in (tmp_path / "d" / "README.md").read_text()  # the card records it too


@pytest.mark.parametrize("bad", ["int64", "zero", "times3", "nan"])
def test_directional_ablation_from_a_diff_gets_the_constructors_checks(tmp_path: Path, bad: str) -> None:
    d, model = _diff(tmp_path, iv.DirectionalAblation(v32(), sites="layers.1", name="a"))
    key = "a.direction:layers.1"
    change = {"int64": lambda t: t.__setitem__(key, torch.arange(32)),
              "zero": lambda t: t.__setitem__(key, torch.zeros(32)),
              "times3": lambda t: t.__setitem__(key, t[key] * 3),
              "nan": lambda t: t[key].__setitem__(0, float("nan"))}[bad]
    _rewrite_weights(d, change)
    _refused(d, model, match="direction")


@pytest.mark.parametrize("field,value", [("scale", True), ("scale", "2"), ("scale", None)])
def test_params_are_strictly_typed(tmp_path: Path, field: str, value) -> None:
    d, model = _diff(tmp_path, iv.Steering({"layers.1": v32()}, name="s"))
    _edit(d, lambda c: c["interventions"][0]["params"].__setitem__(field, value))
    err = _refused(d, model, match=r"interventions\[0\]")
    assert "params.scale" in str(err)


@pytest.mark.parametrize("edit", [
    lambda c: c.update(format_version=True),
    lambda c: (c.update(format_version=True), c.pop("weights")),  # pydantic's Literal[1] would take True
    lambda c: (c.update(format_version=1.0), c.pop("weights")),
    lambda c: c.update(surprise=1),
    lambda c: c["interventions"][0].update(name="steer\n"),
    lambda c: c["interventions"][0].update(positions={"per_example": [[1.9]]}),
    lambda c: c["interventions"][0].update(positions=[2**63]),
    lambda c: c["interventions"][0]["params"].update(unknown=1),
    lambda c: c.update(weights={"sha256": "0" * 64, "bytes": 1}),
])
def test_what_the_format_forbids_is_refused(tmp_path: Path, edit) -> None:
    d, model = _diff(tmp_path, iv.Steering({"layers.1": v32()}, name="s"))
    _edit(d, edit)
    _refused(d, model)


def test_integer_and_float8_vectors_are_refused(tmp_path: Path) -> None:
    d, model = _diff(tmp_path, iv.Steering({"layers.1": v32()}, name="s"))
    for dtype in (torch.int64, torch.bool, torch.float8_e4m3fn):
        _rewrite_weights(d, lambda t, dt=dtype: t.__setitem__("s.vector:layers.1", v32().to(dt)))
        _refused(d, model, match="floating")


def test_a_site_that_cannot_take_the_edit_fails_at_load_not_at_forward(tmp_path: Path) -> None:
    d, model = _diff(tmp_path, iv.Steering({"layers.1": v32()}, name="s"))
    _edit(d, lambda c: c["interventions"][0].update(sites=["lm_head"]))
    _rewrite_weights(d, lambda t: t.__setitem__("s.vector:lm_head", t.pop("s.vector:layers.1")))
    _refused(d, model, IncompatibleModelError, match="lm_head")
    # the right width for lm_head's output is a valid edit of the logits
    d2, _ = _diff(tmp_path / "ok", iv.Steering({"lm_head": torch.randn(96)}))
    iv.Intervenable.load(d2, model).detach()


def test_version_1_diffs_load_with_a_warning(tmp_path: Path) -> None:
    d, model = _diff(tmp_path, iv.Steering({"layers.1": v32()}))
    _edit(d, lambda c: (c.update(format_version=1), c.pop("weights")))
    with pytest.warns(UncheckedFileWarning, match="no checksum"):
        iv.Intervenable.load(d, model).detach()


def test_deep_nesting_and_huge_numbers_are_named_errors(tmp_path: Path) -> None:
    d, model = _diff(tmp_path, iv.Steering({"layers.1": v32()}))
    text = (d / CONFIG_NAME).read_text()
    (d / CONFIG_NAME).write_text(text.replace('"metadata": {}', '"metadata": ' + "[" * 100_000 + "]" * 100_000))
    _refused(d, model, match="nesting")
    (d / CONFIG_NAME).write_text(text.replace('"format_version": 2', '"format_version": 1' + "0" * 5000))
    _refused(d, model, match="digits")


# ---- the file system -----------------------------------------------------------------------------
def test_symlinks_leading_out_fifos_and_devices_are_refused_without_blocking(tmp_path: Path) -> None:
    d, model = _diff(tmp_path, iv.Steering({"layers.1": v32()}))
    other, _ = _diff(tmp_path / "other", iv.Steering({"layers.1": v32(1)}))
    (d / CONFIG_NAME).unlink()
    (d / CONFIG_NAME).symlink_to(other / CONFIG_NAME)
    _refused(d, model, match="outside")
    (d / CONFIG_NAME).unlink()
    os.mkfifo(d / CONFIG_NAME)
    t0 = time.monotonic()
    _refused(d, model, match="FIFO")
    (d / CONFIG_NAME).unlink()
    (d / CONFIG_NAME).symlink_to("/dev/zero")
    _refused(d, model)
    assert time.monotonic() - t0 < 5


def test_hugging_face_cache_snapshots_may_link_into_their_blobs(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--me--diff"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "f00d").write_text("{}")
    (snap / "cfg.json").symlink_to("../../blobs/f00d")
    assert Root(snap, DiffFormatError).read_json("cfg.json") == {}
    (tmp_path / "secret").write_text("{}")
    (snap / "leak.json").symlink_to(tmp_path / "secret")
    with pytest.raises(DiffFormatError, match="outside"):
        Root(snap, DiffFormatError).read_json("leak.json")


def test_unreadable_files_are_named_errors_with_the_path(tmp_path: Path, monkeypatch) -> None:
    d, model = _diff(tmp_path, iv.Steering({"layers.1": v32()}))
    real_open = os.open

    def deny(path, flags, *a, **k):
        if str(path).endswith(WEIGHTS_NAME):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    err = _refused(d, model, match="Permission denied")
    assert err.path.endswith(WEIGHTS_NAME)


def test_json_bounds() -> None:
    for text, match in ((b"[" * 100_000 + b"]" * 100_000, "nesting"), (b"1" + b"0" * 5000, "digits"),
                        (b'{"a": NaN}', "NaN"), (b'{"a": 1e999}', "finite"), (b'{"a": 1, "a": 2}', "unique"),
                        (b'"\\ud800"', "surrogate"), (b"\xff", "UTF-8")):
        with pytest.raises(DiffFormatError, match=match):
            parse_json(text, DiffFormatError, "x.json")


# ---- the other formats -----------------------------------------------------------------------------
def test_probe_nan_and_wrong_types(tmp_path: Path) -> None:
    from intervene import probes
    from intervene.probes.synthetic import planted_features

    x, y, _ = planted_features(40, 4, seed=1)
    probes.MeanDiffProbe().fit(x, y).save(tmp_path / "p")
    t = load_file(str(tmp_path / "p" / "probe.safetensors"))
    t["coef_"][0] = float("nan")
    save_file(t, str(tmp_path / "p" / "probe.safetensors"))
    with pytest.raises(ProbeFormatError, match="finite"):
        probes.load_probe(tmp_path / "p")
    probes.MeanDiffProbe().fit(x, y).save(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "probe.json").read_text())
    cfg["params"]["scale_by_variance"] = 1
    (tmp_path / "q" / "probe.json").write_text(json.dumps(cfg))
    with pytest.raises(ProbeFormatError, match="params.scale_by_variance"):
        probes.load_probe(tmp_path / "q")


def test_sae_with_nan_weights_or_true_for_k(tmp_path: Path) -> None:
    from intervene.features import load_sae, save_sae
    from tests.test_sae import rand_sae

    save_sae(rand_sae("topk"), tmp_path / "s", layout="saelens")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg["k"] = True
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="k"):
        load_sae(tmp_path / "s")
    save_sae(rand_sae("relu"), tmp_path / "r", layout="saelens")
    t = load_file(str(tmp_path / "r" / "sae_weights.safetensors"))
    t["W_dec"][0, 0] = float("inf")
    save_file(t, str(tmp_path / "r" / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match="finite"):
        load_sae(tmp_path / "r")


def test_caches_refuse_bad_indexes(tmp_path: Path) -> None:
    from intervene.activations import Activations, collect
    from intervene.features import LatentCache, cache_latents
    from tests.test_collect import TEXTS, word_tokenizer
    from tests.test_sae import rand_sae

    model = tiny_model("llama")
    acts = collect(model, word_tokenizer(), TEXTS, "layers.1", cache_dir=tmp_path / "a", progress=False)
    index = json.loads((acts.cache_path / "index.json").read_text())
    index["shards"][0]["file"] = 7
    (acts.cache_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ActivationCacheError, match=r"shards\[0\].file"):
        Activations.open(acts.cache_path)
    cache = cache_latents(model, rand_sae(), torch.randint(3, 96, (4, 8)), tmp_path / "l", progress=False)
    index = json.loads((cache.path / "index.json").read_text())
    index["n_shards"] = 2**70
    (cache.path / "index.json").write_text(json.dumps(index))
    with pytest.raises(LatentCacheError, match="n_shards|digits|less than"):
        LatentCache(cache.path).cooccurring(0)


def test_pyvene_dimensions_and_sources(tmp_path: Path) -> None:
    from intervene.interop.pyvene import export_pyvene, import_pyvene

    model = tiny_model("llama")
    hooks = count_hooks(model)  # transformers may have installed its own output-capturing hooks already
    export_pyvene(iv.Intervenable(model, iv.Steering({"layers.1": v32()}), attach=False), tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    for dim in (0, -1, 33):
        (tmp_path / "p" / "config.json").write_text(json.dumps({**cfg, "intervention_dimensions": [dim]}))
        with pytest.raises(InterveneFileError):
            import_pyvene(tmp_path / "p", model)
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    key = cfg["sorted_keys"][0]
    for src in (torch.zeros(0), v32()[:31], torch.cat([v32(), v32()[:1]])):
        torch.save({"source_representation": src}, tmp_path / "p" / f"intkey_{key}.bin")
        with pytest.raises((DiffFormatError, InteropError)):
            import_pyvene(tmp_path / "p", model)
    assert count_hooks(model) == hooks


def test_cli_prints_one_line(tmp_path: Path, capsys) -> None:
    import argparse

    from intervene.command import guard

    d, _ = _diff(tmp_path, iv.Steering({"layers.1": v32()}))
    (d / CONFIG_NAME).write_text('{"format_version": 2, "interventions": [], "x\\ny": 1}')

    def run(args: argparse.Namespace) -> int:
        iv.Intervenable.load(d, tiny_model("llama"))
        return 0

    assert guard(run)(argparse.Namespace(command="demo")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DiffFormatError" in err and CONFIG_NAME in err


def test_a_resume_state_claiming_more_progress_is_refused(tmp_path: Path, monkeypatch) -> None:
    import intervene.features.cache as cache_mod
    from intervene.features import cache_latents
    from tests.test_sae import rand_sae

    model, sae, tokens = tiny_model("llama"), rand_sae(), torch.randint(3, 96, (8, 8))
    real, calls = cache_mod._run_model, {"n": 0}

    class Stop(BaseException):
        pass

    def flaky(m, ids):
        calls["n"] += 1
        if calls["n"] > 2:
            raise Stop
        real(m, ids)

    monkeypatch.setattr(cache_mod, "_run_model", flaky)
    with pytest.raises(Stop):
        cache_latents(model, sae, tokens, tmp_path / "c", batch_size=2, buffer_size=1, progress=False)
    monkeypatch.setattr(cache_mod, "_run_model", real)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    index["next_batch"] += 1  # would skip a batch: the cache would silently miss its activations
    (tmp_path / "c" / "index.json").write_text(json.dumps(index))
    with pytest.raises(LatentCacheError, match="next_batch"):
        cache_latents(model, sae, tokens, tmp_path / "c", batch_size=2, buffer_size=1, progress=False)
