"""Valid files of every format the fuzz suite mutates, built once per process from fixed seeds.

Each seed is a directory (for a GGUF control vector: a directory holding the one file) plus what
its loader needs to know. Everything is deterministic: the same seeds on every run.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import intervene as iv
from tests.tiny_models import tiny_model

MODEL = "llama"
LAYERS_RAW = ("lm_head", "model.layers.0.mlp.act_fn")  # a Linear output and a module whose width needs a forward


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class Seed:
    """A valid instance of a format: ``root`` (copied per case), the loader's name, files it must read."""

    name: str
    fmt: str  # the loader (see tests/fuzz/formats.py)
    root: Path
    required: tuple[str, ...]  # relative paths the loader must read: removing / replacing them must be refused
    checksummed: tuple[str, ...] = ()  # files whose every byte is covered by a checksum
    extra: dict[str, Any] = field(default_factory=dict)


def model() -> torch.nn.Module:
    return tiny_model(MODEL)


# ---- diffs ---------------------------------------------------------------------------------------
def _steer_ablate(m: torch.nn.Module, seed: int) -> list[iv.Intervention]:
    heads = iv.resolve_site(m, "layers.0.heads").heads
    return [iv.Steering({"layers.1": torch.randn(32, generator=_g(seed)),
                         "layers.0.heads": torch.randn(*heads, generator=_g(seed + 1))}, scale=2.0, name="steer"),
            iv.DirectionalAblation(torch.randn(32, generator=_g(seed + 2)), sites="layers.*", value=0.5,
                                   positions={"per_example": [[0, -1], [2]]}, name="ablate")]


def _diff(out: Path, m: torch.nn.Module, ivs: list[iv.Intervention], meta: dict[str, Any] | None = None) -> Path:
    ivm = iv.Intervenable(m, ivs, attach=False)
    ivm.metadata = meta or {"note": "fuzz seed", "n": 3}
    ivm.save_pretrained(out)
    return out


def _diffs(base: Path, m: torch.nn.Module) -> list[Seed]:
    from tests.conformance.cases import iti, remedi, sae_clamp

    req = ("intervene_config.json", "intervene_weights.safetensors")
    out = [Seed("diff_steer", "diff", _diff(base / "diff_steer", m, _steer_ablate(m, 0)), req, req[1:]),
           Seed("diff_iti", "diff", _diff(base / "diff_iti", m, [iti(m, "all")]), req, req[1:]),
           Seed("diff_remedi", "diff", _diff(base / "diff_remedi", m, [remedi(m, "all")]), req, req[1:]),
           Seed("diff_clamp", "diff", _diff(base / "diff_clamp", m, [sae_clamp(m, "last")]), req, req[1:])]
    raw = [iv.Steering({LAYERS_RAW[0]: torch.randn(96, generator=_g(7))}, scale=0.5, name="logits"),
           iv.Steering({LAYERS_RAW[1]: torch.randn(64, generator=_g(8))}, positions=[0, -1], name="act")]
    out.append(Seed("diff_raw", "diff", _diff(base / "diff_raw", m, raw), req, req[1:]))
    # format version 1: no checksum (still read, with a warning)
    v1 = _diff(base / "diff_v1", m, _steer_ablate(m, 20))
    cfg = json.loads((v1 / req[0]).read_text())
    cfg["format_version"] = 1
    del cfg["weights"]
    (v1 / req[0]).write_text(json.dumps(cfg, indent=2))
    out.append(Seed("diff_v1", "diff", v1, req))
    # the same structure with other tensors: the "new" side of an interrupted save
    out[0].extra["other"] = _diff(base / "diff_steer_new", m, _steer_ablate(m, 40))
    return out


# ---- probes --------------------------------------------------------------------------------------
def _probes(base: Path) -> list[Seed]:
    from intervene import probes
    from intervene.probes.synthetic import planted_features, planted_pairs

    out = []
    for kind in ("lr", "mean_diff", "lda", "ccs", "crc", "lr_batched"):
        batch = (2, 3) if kind == "lr_batched" else ()
        if kind in ("ccs", "crc"):
            xp, xn, y, _ = planted_pairs(60, 6, seed=1)
            p = probes.CCSProbe(n_restarts=1, max_iter=50) if kind == "ccs" else probes.CRCProbe(method="pca")
            p = p.fit(xp, xn).calibrate(xp, xn, y)
        else:
            x, y, _ = planted_features(60, 6, batch=batch, seed=1)
            p = {"mean_diff": probes.MeanDiffProbe(), "lda": probes.LDAProbe(shrinkage=0.1)}.get(
                kind, probes.LogisticRegressionProbe(Cs=[0.1, 1.0], cv=3)).fit(x, y)
        root = base / f"probe_{kind}"
        p.save(root)
        out.append(Seed(f"probe_{kind}", "probe", root, ("probe.json", "probe.safetensors"),
                        extra={"width": 6, "batch": batch}))
    return out


# ---- SAEs ----------------------------------------------------------------------------------------
def _sae(activation: str, seed: int, d_sae: int = 24) -> Any:
    from intervene.features import SAE

    g = _g(seed)
    thr = torch.rand(d_sae, generator=g) * 0.2 if activation == "jumprelu" else None
    return SAE(torch.randn(32, d_sae, generator=g) / 6, torch.randn(d_sae, generator=g) * 0.1,
               torch.randn(d_sae, 32, generator=g) / 5, torch.randn(32, generator=g) * 0.1, activation=activation,
               k={"topk": 5, "groupmax": 4}.get(activation), threshold=thr, site="layers.1",
               apply_b_dec_to_input=True)


def _saes(base: Path) -> list[Seed]:
    from safetensors.torch import save_file

    from intervene.features import save_sae

    out = []
    for layout, act in (("sparsify", "topk"), ("sparsify", "groupmax"), ("saelens", "relu"),
                        ("saelens", "jumprelu"), ("saelens", "topk")):
        root = base / f"sae_{layout}_{act}"
        save_sae(_sae(act, len(out)), root, layout=layout)
        weights = "sae.safetensors" if layout == "sparsify" else "sae_weights.safetensors"
        out.append(Seed(root.name, "sae", root, (weights,)))  # without cfg.json some SAEs are still well defined
    g = _g(30)  # a SAELens gated SAE and a pre-6.0 flat config, written by hand as SAELens does
    gated = base / "sae_saelens_gated"
    gated.mkdir()
    save_file({"W_enc": torch.randn(32, 16, generator=g) / 6, "b_gate": torch.randn(16, generator=g) * 0.1,
               "b_mag": torch.randn(16, generator=g) * 0.1, "r_mag": torch.randn(16, generator=g) * 0.1,
               "W_dec": torch.randn(16, 32, generator=g) / 4, "b_dec": torch.randn(32, generator=g) * 0.1},
              str(gated / "sae_weights.safetensors"))
    (gated / "cfg.json").write_text(json.dumps({
        "architecture": "gated", "d_in": 32, "d_sae": 16, "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"sae_lens_version": "6.3.0", "hook_name": "blocks.1.hook_resid_post"}}))
    out.append(Seed(gated.name, "sae", gated, ("sae_weights.safetensors",)))
    pre6 = base / "sae_saelens_pre6"
    pre6.mkdir()
    save_file({"W_enc": torch.randn(32, 16, generator=g) / 6, "b_enc": torch.randn(16, generator=g) * 0.1,
               "W_dec": torch.randn(16, 32, generator=g) / 4, "b_dec": torch.randn(32, generator=g) * 0.1},
              str(pre6 / "sae_weights.safetensors"))
    (pre6 / "cfg.json").write_text(json.dumps({
        "d_in": 32, "d_sae": 16, "hook_point": "blocks.0.hook_resid_post", "hook_point_layer": 0,
        "activation_fn_str": "relu", "apply_b_dec_to_input": False, "normalize_activations": False,
        "sae_lens_version": "3.1.0", "lr": 0.0004, "seed": 42}))
    out.append(Seed(pre6.name, "sae", pre6, ("sae_weights.safetensors",)))
    return out


# ---- caches --------------------------------------------------------------------------------------
def _activation_caches(base: Path, m: torch.nn.Module) -> list[Seed]:
    from intervene.activations import collect
    from tests.test_collect import TEXTS, word_tokenizer

    out = []
    for positions in ("last", "all", [0, -1]):
        name = f"acts_{positions if isinstance(positions, str) else 'idx'}"
        acts = collect(m, word_tokenizer(), TEXTS, "layers.*", positions=positions, batch_size=2,
                       cache_dir=base / name, shard_bytes=600, progress=False)
        root = acts.cache_path
        files = tuple(sorted(p.name for p in root.iterdir()))
        want = {s: acts[s].clone() for s in acts.sites}
        out.append(Seed(name, "acts", root, files, tuple(f for f in files if f != "index.json"),
                        extra={"want": want, "lengths": acts.offsets}))
    return out


def _latent_settings() -> dict[str, Any]:
    return dict(batch_size=2, buffer_size=60, shard_width=10, progress=False)


def _tokens() -> torch.Tensor:
    return torch.randint(3, 96, (8, 12), generator=_g(5))


def _latent_caches(base: Path, m: torch.nn.Module) -> list[Seed]:
    from intervene.features import cache_latents, export_delphi
    from tests.test_latent_cache import word_tokenizer

    out = []
    for name, act in (("latents_relu", "relu"), ("latents_topk", "topk")):
        sae = _sae(act, 50)
        cache = cache_latents(m, sae, _tokens(), base / name,
                              tokenizer=word_tokenizer() if act == "relu" else None, **_latent_settings())
        files = tuple(sorted(str(p.relative_to(cache.path)) for p in cache.path.rglob("*") if p.is_file()))
        want = {"dense": cache.dense(), "tokens": cache.tokens.clone(),
                "stats": {k: v.clone() for k, v in cache.stats.items()}, "co": cache.cooccurring(1, top=100)}
        out.append(Seed(name, "latents", cache.path, tuple(f for f in files if not f.startswith("tokenizer/")),
                        tuple(f for f in files if f.endswith(".safetensors")), extra={"want": want, "sae": sae}))
    # delphi: our export of the first cache, imported back
    delphi_root = base / "delphi_raw"
    export_delphi(out[0].root, delphi_root, module="model.layers.1", n_splits=3, threshold=0.0, progress=False)
    names = tuple(sorted(str(p.relative_to(delphi_root)) for p in delphi_root.rglob("*.safetensors")))
    out.append(Seed("delphi", "delphi", delphi_root, names, extra={"want": out[0].extra["want"]["dense"]}))
    # an interrupted cache: resumed by cache_latents
    sae = out[0].extra["sae"]
    import intervene.features.cache as cache_mod

    real, calls = cache_mod._run_model, {"n": 0}

    class _Stop(BaseException):
        pass

    def flaky(mm: Any, ids: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise _Stop
        real(mm, ids)

    cache_mod._run_model = flaky
    try:
        cache_latents(m, sae, _tokens(), base / "latents_partial", **_latent_settings())
    except _Stop:
        pass
    finally:
        cache_mod._run_model = real
    part = base / "latents_partial"
    files = tuple(sorted(str(p.relative_to(part)) for p in part.rglob("*") if p.is_file()))
    # nothing is "required": a resume without an index starts afresh (and must still give the reference)
    out.append(Seed("latents_resume", "latents_resume", part, (), tuple(f for f in files if f.endswith(".safetensors")),
                    extra={"want": out[0].extra["want"]["dense"], "sae": sae, "files": files}))
    return out


# ---- interop -------------------------------------------------------------------------------------
def _pyvene(base: Path, m: torch.nn.Module) -> list[Seed]:
    from intervene.interop.pyvene import export_pyvene

    root = base / "pyvene_export"
    steer = iv.Steering({"layers.1": torch.randn(32, generator=_g(60)), "layers.0.mlp": torch.randn(32, generator=_g(61))},
                        scale=1.5)
    export_pyvene(iv.Intervenable(m, steer, attach=False), root)
    out = [Seed("pyvene_export", "pyvene", root, tuple(sorted(p.name for p in root.iterdir())))]
    try:
        import copy

        import pyvene as pv
    except ImportError:  # the pyvene extra is not installed: our own export still covers the format
        return out
    logging.disable(logging.WARNING)
    try:
        mm = copy.deepcopy(m)  # pyvene removes every hook on a model it wraps
        cfg = pv.IntervenableConfig(representations=[
            {"layer": 1, "component": "block_output",
             "intervention": pv.AdditionIntervention(source_representation=torch.randn(32, generator=_g(62)),
                                                     embed_dim=32)},
            {"layer": 0, "component": "mlp_output",
             "intervention": pv.SubtractionIntervention(source_representation=torch.randn(32, generator=_g(63)),
                                                        embed_dim=32)},
            {"layer": 0, "component": "attention_output", "intervention": pv.ZeroIntervention(embed_dim=4)}])
        native = base / "pyvene_native"
        pv.IntervenableModel(cfg, mm).save(str(native))
    finally:
        logging.disable(logging.NOTSET)
    out.append(Seed("pyvene_native", "pyvene", native, tuple(sorted(p.name for p in native.iterdir()))))
    return out


def _gguf(base: Path, m: torch.nn.Module) -> list[Seed]:
    from intervene.interop.gguf import export_control_vector

    root = base / "gguf"
    root.mkdir()
    steer = iv.Steering({"layers.1": torch.randn(32, generator=_g(70))}, scale=2.0)
    export_control_vector(iv.Intervenable(m, steer, attach=False), root / "cv.gguf")
    return [Seed("gguf", "gguf", root, ("cv.gguf",), extra={"file": "cv.gguf"})]


@functools.cache
def build(base: Path) -> dict[str, Seed]:
    """Every seed, under ``base`` (built afresh once per process and directory)."""
    import shutil

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    m = model()
    seeds: list[Seed] = []
    for make in (lambda: _diffs(base, m), lambda: _probes(base), lambda: _saes(base),
                 lambda: _activation_caches(base, m), lambda: _latent_caches(base, m), lambda: _pyvene(base, m),
                 lambda: _gguf(base, m)):
        seeds += make()
    return {s.name: s for s in seeds}
