"""Per format: how to load a case (the public loader), and what a correct load must satisfy.

``load(seed, root, model)`` returns a plain, comparable result (tensors cloned to CPU); ``check``
asserts the format's invariants on an accepted load: floating, finite tensors, and no coercion (what
was loaded is exactly what the file says: ``true`` did not become ``1.0``, ``1.9`` did not become
``1``, an unknown key was not dropped, an integer tensor was not converted). Caches are checksummed,
so an accepted cache must give exactly the seed's data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import intervene as iv
from tests.fuzz.seeds import Seed, _latent_settings, _tokens

IDS = torch.tensor([[1, 5, 9, 13, 4], [0, 0, 7, 2, 3]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").clone()


def _finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for k, t in tensors.items():
        assert t.is_floating_point(), f"{what}: tensor {k} has dtype {t.dtype}"
        assert bool(torch.isfinite(t).all()), f"{what}: tensor {k} is not finite"


def same_json(a: Any, b: Any) -> bool:
    """Equality that keeps JSON types apart (``True != 1``, ``1.9 != 1``; ``3 == 3.0``; tuples are lists)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def equal(a: Any, b: Any) -> bool:
    """Deep equality of results (tensors bitwise, with dtype)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return same_json(a, b)


# ---- diffs -----------------------------------------------------------------------------------------
def load_diff(seed: Seed, root: Path, model: torch.nn.Module) -> Any:
    ivm = iv.Intervenable.load(root, model, attach=True)
    try:
        with torch.no_grad():
            ivm(input_ids=IDS, attention_mask=MASK)  # a load must not fail at the first forward
        return {"metadata": ivm.metadata,
                "interventions": [{"type": x.type_name, "name": x.name, "sites": list(x.sites),
                                   "positions": x.positions.to_json(), "params": x.params(),
                                   "tensors": {k: _cpu(t) for k, t in x.tensors().items()}}
                                  for x in ivm.interventions]}
    finally:
        ivm.detach()


def check_diff(seed: Seed, root: Path, got: Any) -> None:
    from safetensors.torch import load_file

    from intervene.diff_format import CONFIG_NAME, committed_weights

    cfg = json.loads((root / CONFIG_NAME).read_text())
    weights = load_file(str(committed_weights(root)))
    assert len(got["interventions"]) == len(cfg["interventions"])
    assert same_json(got["metadata"], cfg.get("metadata", {})), "metadata changed on load"
    for x, e in zip(got["interventions"], cfg["interventions"]):
        _finite(x["tensors"], x["name"])
        assert (x["type"], x["name"], x["sites"]) == (e["type"], e["name"], e["sites"])
        assert same_json(x["positions"], e.get("positions", "all")), f"positions {e.get('positions')} coerced"
        for k, v in (e.get("params") or {}).items():
            assert same_json(x["params"].get(k, {} if v == {} else None), v), f"params.{k} = {v!r} was coerced"
        own = {k[len(x["name"]) + 1:]: t for k, t in weights.items() if k.startswith(x["name"] + ".")}
        assert own.keys() == x["tensors"].keys(), "tensors dropped or added on load"
        for k, t in own.items():
            assert t.is_floating_point(), f"an integer tensor {k} was accepted"
            assert x["tensors"][k].shape == t.shape and torch.equal(x["tensors"][k].double(), t.double()), k


# ---- probes ----------------------------------------------------------------------------------------
def load_probe(seed: Seed, root: Path, model: torch.nn.Module) -> Any:
    p = iv.probes.load_probe(root)
    tensors = {k: _cpu(v) for k, v in p._learned_tensors().items()}
    return {"type": p.probe_type, "params": p.get_params(), "meta": p._learned_meta(), "tensors": tensors,
            "direction": _cpu(torch.as_tensor(p.direction_))}


def check_probe(seed: Seed, root: Path, got: Any) -> None:
    from safetensors.torch import load_file

    cfg = json.loads((root / "probe.json").read_text())
    _finite(got["tensors"], "probe")
    assert got["type"] == cfg["type"]
    for k, v in cfg["params"].items():
        assert same_json(got["params"][k], v), f"params.{k} = {v!r} was coerced"
    for k, v in cfg.get("meta", {}).items():
        assert same_json(got["meta"].get(k), v), f"meta.{k} = {v!r} was coerced"
    assert equal(got["tensors"], load_file(str(root / "probe.safetensors")))


# ---- SAEs ------------------------------------------------------------------------------------------
def load_sae(seed: Seed, root: Path, model: torch.nn.Module) -> Any:
    sae = iv.load_sae(str(root), model=model)
    x = torch.randn(3, sae.d_in, generator=torch.Generator().manual_seed(0))
    sae.decode(sae.encode(x), x)  # runs
    return {"buffers": {k: _cpu(v) for k, v in sae.named_buffers()},
            "settings": [sae.activation, sae.k, sae.site, sae.output_site, sae.apply_b_dec_to_input]}


def check_sae(seed: Seed, root: Path, got: Any) -> None:
    _finite(got["buffers"], "SAE")


# ---- caches ----------------------------------------------------------------------------------------
def load_acts(seed: Seed, root: Path, model: torch.nn.Module) -> Any:
    from intervene.activations import Activations

    acts = Activations.open(root)
    out = {s: _cpu(acts[s]) for s in acts.sites}
    return {"sites": out, "offsets": acts.offsets}


def check_acts(seed: Seed, root: Path, got: Any) -> None:
    assert equal(got["sites"], seed.extra["want"]), "a checksummed cache loaded other data"
    assert equal(got["offsets"], seed.extra["lengths"])


def _read_latents(cache: Any) -> Any:
    tok = cache.tokenizer()
    return {"dense": cache.dense(), "tokens": _cpu(cache.tokens), "stats": {k: _cpu(v) for k, v in cache.stats.items()},
            "co": cache.cooccurring(1, top=100), "tokenizer": None if tok is None else len(tok)}


def load_latents(seed: Seed, root: Path, model: torch.nn.Module) -> Any:
    return _read_latents(iv.features.LatentCache(root))


def check_latents(seed: Seed, root: Path, got: Any) -> None:
    want = seed.extra["want"]
    for k in ("dense", "tokens", "stats", "co"):
        assert equal(got[k], want[k]), f"a checksummed cache loaded other {k}"


def load_resume(seed: Seed, root: Path, model: torch.nn.Module) -> Any:
    cache = iv.features.cache_latents(model, seed.extra["sae"], _tokens(), root, **_latent_settings())
    return {"dense": cache.dense()}


def check_resume(seed: Seed, root: Path, got: Any) -> None:
    assert equal(got["dense"], seed.extra["want"]), "a resumed cache differs from an uninterrupted run"


def load_delphi(seed: Seed, root: Path, model: torch.nn.Module) -> Any:
    cache = iv.features.import_delphi(root, "model.layers.1", root / "imported-cache", d_sae=24)
    return {"dense": cache.dense(), "tokens": _cpu(cache.tokens)}


def check_delphi(seed: Seed, root: Path, got: Any) -> None:
    _finite({"dense": got["dense"]}, "delphi import")


# ---- interop ---------------------------------------------------------------------------------------
def load_pyvene(seed: Seed, root: Path, model: torch.nn.Module) -> Any:
    from intervene.interop.pyvene import import_pyvene

    ivm = import_pyvene(root, model, attach=True)
    try:
        with torch.no_grad():
            ivm(input_ids=IDS, attention_mask=MASK)
        return [{"type": x.type_name, "sites": list(x.sites), "tensors": {k: _cpu(t) for k, t in x.tensors().items()}}
                for x in ivm.interventions]
    finally:
        ivm.detach()


def check_pyvene(seed: Seed, root: Path, got: Any) -> None:
    for x in got:
        _finite(x["tensors"], "pyvene import")
        assert all(t.numel() == 32 for t in x["tensors"].values()), "a source vector was padded or cut"


def load_gguf(seed: Seed, root: Path, model: torch.nn.Module) -> Any:
    from intervene.interop.gguf import import_control_vector

    steer = import_control_vector(root / seed.extra["file"], model)
    return {k: _cpu(t) for k, t in steer.tensors().items()}


def check_gguf(seed: Seed, root: Path, got: Any) -> None:
    _finite(got, "control vector")
    assert all(t.shape == (32,) for t in got.values())


Loader = Callable[[Seed, Path, torch.nn.Module], Any]
Checker = Callable[[Seed, Path, Any], None]
FORMATS: dict[str, tuple[Loader, Checker]] = {
    "diff": (load_diff, check_diff), "probe": (load_probe, check_probe), "sae": (load_sae, check_sae),
    "acts": (load_acts, check_acts), "latents": (load_latents, check_latents),
    "latents_resume": (load_resume, check_resume), "delphi": (load_delphi, check_delphi),
    "pyvene": (load_pyvene, check_pyvene), "gguf": (load_gguf, check_gguf),
}
# the public loader each format exercises (for the report)
LOADERS = {"diff": "Intervenable.load", "probe": "probes.load_probe", "sae": "load_sae",
           "acts": "Activations.open", "latents": "LatentCache", "latents_resume": "cache_latents(resume)",
           "delphi": "import_delphi", "pyvene": "import_pyvene", "gguf": "import_control_vector"}


_REFERENCES: dict[tuple[str, str], Any] = {}


def reference(seed: Seed, root: Path | None = None) -> Any:
    """The result of loading an unmodified seed (or another seed directory): what ``same`` compares with."""
    import shutil
    import tempfile

    from tests.fuzz.seeds import model

    src = Path(root or seed.root)
    key = (seed.name, str(src))
    if key not in _REFERENCES:
        with tempfile.TemporaryDirectory() as tmp:  # loaders that write (resume, delphi) must not touch the seed
            copy = Path(tmp) / "copy"
            shutil.copytree(src, copy, symlinks=True)
            _REFERENCES[key] = FORMATS[seed.fmt][0](seed, copy, model())
    return _REFERENCES[key]
