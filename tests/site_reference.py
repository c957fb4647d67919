"""Plain-PyTorch reference checks behind the coverage sweep (:mod:`tests.site_coverage`).

Nothing here calls intervene except to learn *which* modules it claims (site paths, the writers and
gains of a block it followed step by step); every value is captured with hand-written forward hooks
and every claim is checked against those values:

* steering a site equals a hook that adds the same vector to the same module (:func:`hooked_logits`);
* block 0's output is transformers' own ``hidden_states`` entry;
* a block's output minus its input is a constant times attn plus a constant times mlp, or a post-LN block
  around them (found here, not taken from intervene); for blocks intervene reconstructs step by step,
  every step's identity holds with intervene's measured gains;
* the heads module's input has ``n_heads * head_dim`` features and the config's head count;
* a part claimed absent: the block's one writer mixes tokens (no MLP) or does not (no attention), by a
  hook that perturbs the block's input at position 0 only.
"""

from __future__ import annotations

from typing import Any

import torch

from intervene.sites import layer_parts
from tests.coverage_build import IDS


def _first(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


def hooked_logits(model: torch.nn.Module, path: str, side: str, vec: torch.Tensor) -> torch.Tensor:
    """Logits with ``vec`` added to ``path``'s output (or first input) by a hand-written hook."""
    mod = model.get_submodule(path)
    if side == "output":
        def post(_m, _a, out):
            return out + vec if isinstance(out, torch.Tensor) else type(out)((out[0] + vec, *out[1:]))
        handle = mod.register_forward_hook(post)
    else:
        def pre(_m, args, kwargs):
            if args:
                return (args[0] + vec, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vec}
        handle = mod.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(input_ids=IDS).logits
    finally:
        handle.remove()


def capture(model: torch.nn.Module, paths: dict[str, tuple[str, str]],
            bump: tuple[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """``{key: activation}`` for ``{key: (path, "input"|"output")}`` in one plain forward pass (first call of
    each module). ``bump``: ``(block path, delta)`` added to that module's first input."""
    got: dict[str, torch.Tensor] = {}
    handles = []

    def post(key: str):
        def fn(_m, _a, out) -> None:
            got.setdefault(key, _first(out).detach().clone())  # blocks may add in place later
        return fn

    def pre(key: str):
        def fn(_m, args, kwargs) -> None:
            got.setdefault(key, (args[0] if args else kwargs["hidden_states"]).detach().clone())
        return fn

    def add(_m, args, kwargs):
        if args:
            return (args[0] + bump[1], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + bump[1]}

    if bump is not None:
        handles.append(model.get_submodule(bump[0]).register_forward_pre_hook(add, with_kwargs=True))
    for key, (path, side) in paths.items():
        mod = model.get_submodule(path)
        if side == "output":
            handles.append(mod.register_forward_hook(post(key)))
        else:
            handles.append(mod.register_forward_pre_hook(pre(key), with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids=IDS, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return got, out


def resid(t: torch.Tensor, h: int) -> torch.Tensor:
    return t.reshape(IDS.shape[0], -1, h).double()


def _gain(g: float | tuple[float, ...], h: int) -> torch.Tensor:
    return torch.full((h,), g, dtype=torch.float64) if isinstance(g, float) else torch.tensor(g, dtype=torch.float64)


def _tol(*ts: torch.Tensor) -> float:
    return 1e-5 * max(float(t.abs().max()) for t in ts)


def block0_problem(model: torch.nn.Module, blocks: str, between: float = 1.0) -> str | None:
    """Block 0's output against transformers' ``hidden_states``: the entry after the embedding's where
    the first entry is block 0's input, else the first (Mamba and RWKV record block outputs only). Where
    intervene reports that the model rescales the residual between blocks (``between``: RWKV halves it),
    transformers records the rescaled value, which must then be block 1's input and ``between`` times
    block 0's output."""
    got, out = capture(model, {"b0": (f"{blocks}.0", "output"), "x0": (f"{blocks}.0", "input"),
                               "x1": (f"{blocks}.1", "input")})
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        return None
    x0 = got["x0"][:, -hs[0].shape[1]:] if got["x0"].ndim == 3 else got["x0"]
    ref = hs[1] if x0.shape == hs[0].shape and torch.equal(x0, hs[0]) else hs[0]
    b0 = got["b0"][:, -ref.shape[1]:] if got["b0"].ndim == 3 else got["b0"]  # CPM-Ant drops its prompt tokens
    if torch.equal(ref, b0):
        return None
    if between != 1.0 and torch.equal(ref, got["x1"]) and torch.allclose(got["x1"], between * b0, rtol=1e-6, atol=0):
        return None
    return "block 0's output is not transformers' hidden_states entry for it"


def _post_ln(model: torch.nn.Module, block_path: str, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor,
             m: torch.Tensor, h: int, tol: float) -> bool:
    """Post-LN: the block has a module reading ``x + attn`` (N1) and one reading ``N1(...) + mlp`` whose
    output is the block's output (N2)."""
    block = model.get_submodule(block_path)
    paths = {f"{k}:{r}": (f"{block_path}.{r}", k) for r, _ in block.named_modules() if r for k in ("input", "output")}
    got, _ = capture(model, paths)
    acts = {k: resid(v, h) for k, v in got.items() if v.numel() == x.numel() and v.shape[-1] == h}
    n1 = [r for k, v in acts.items() if k.startswith("input:") and float((v - x - a).abs().max()) <= tol
          for r in [k[6:]]]
    for r1 in n1:
        o1 = acts.get(f"output:{r1}")
        for k, v in acts.items():
            if k.startswith("input:") and o1 is not None and float((v - o1 - m).abs().max()) <= tol:
                out2 = acts.get(f"output:{k[6:]}")
                if out2 is not None and float((out2 - y).abs().max()) <= tol:
                    return True
    return False


def block_problem(model: torch.nn.Module, block_path: str, layer: int, h: int) -> str | None:
    """Does block ``layer`` write into its residual what intervene says it does?"""
    parts = layer_parts(model, layer)
    if parts.steps:
        return _steps_problem(model, block_path, layer, h)
    paths = {"in": (block_path, "input"), "out": (block_path, "output"),
             "attn": (f"{block_path}.{parts.attn}", "output"), "mlp": (f"{block_path}.{parts.mlp}", "output")}
    got, _ = capture(model, paths)
    x, y, a, m = (resid(got[k], h) for k in ("in", "out", "attn", "mlp"))
    tol = _tol(x, y, a, m)
    basis = torch.stack([a.reshape(-1), m.reshape(-1)], 1)  # out - in = α attn + β mlp, α β constants
    coef = torch.linalg.lstsq(basis, (y - x).reshape(-1, 1)).solution
    off = float((basis @ coef - (y - x).reshape(-1, 1)).abs().max())
    if off > tol and not _post_ln(model, block_path, x, y, a, m, h, tol):
        return (f"block {layer}'s output minus its input is not a constant times attn plus a constant times mlp, "
                f"nor a post-LN block around them (off by {off:.2e})")
    return None


def _steps_problem(model: torch.nn.Module, block_path: str, layer: int, h: int) -> str | None:
    """Every step ``target = resid * base + Σ gain * writer (+ offset)`` intervene reports for the block,
    with its gains, on values captured here; and the attn / MLP sites are writers of some step."""
    parts = layer_parts(model, layer)

    def where(point: str) -> tuple[str, str]:
        if point in ("input", "output"):
            return block_path, point
        rel, side = point.rsplit(":", 1)
        return f"{block_path}.{rel}", side

    paths: dict[str, tuple[str, str]] = {}
    for s in parts.steps:
        paths[s.target], paths[s.base] = where(s.target), where(s.base)
        paths.update({f"{w}:output": where(f"{w}:output") for w in s.writers})
    got, _ = capture(model, paths)
    acts = {k: resid(v, h) for k, v in got.items()}
    for k, s in enumerate(parts.steps):
        t = acts[s.target]
        fitted = _gain(s.resid, h) * acts[s.base]
        for w, g in zip(s.writers, s.gains):
            fitted = fitted + _gain(g, h) * acts[f"{w}:output"]
        if s.offset is not None:
            fitted = fitted + torch.tensor(s.offset, dtype=torch.float64)
        off = float((fitted - t).abs().max())
        if off > _tol(t, fitted):
            return f"block {layer}, step {k} ({s.target} from {s.base}): off by {off:.2e} with the reported gains"
    writers = {w for s in parts.steps for w in s.writers}
    for part in ("attn", "mlp"):
        name = getattr(parts, part)
        if name is not None and name not in writers:
            return f"block {layer}'s {part} site {name} is not among the writers of its steps"
    return None


def mixes_tokens(model: torch.nn.Module, block_path: str, writer: str, h: int) -> bool | None:
    """Does the block's writer output move at later positions when only position 0 of the block's input
    moves? (``None``: not even position 0 moved.)"""
    got, _ = capture(model, {"w": (f"{block_path}.{writer}", "output"), "x": (block_path, "input")})
    delta = torch.zeros_like(resid(got["x"], h)).float()
    delta[:, 0] = torch.randn(delta.shape[0], h, generator=torch.Generator().manual_seed(3)) * float(got["x"].abs().max())
    moved, _ = capture(model, {"w": (f"{block_path}.{writer}", "output")}, bump=(block_path, delta.reshape(got["x"].shape)))
    d = (resid(moved["w"], h) - resid(got["w"], h)).abs()
    if float(d[:, 0].max()) == 0.0:
        return None
    return bool(float(d[:, 1:].max()) > 1e-3 * float(got["w"].abs().max()))


def heads_problems(model: torch.nn.Module, heads: Any, attn: Any) -> list[str]:
    """The heads site at one layer: width, the config's head count, and what it feeds."""
    h = attn.width
    got, _ = capture(model, {"heads_in": (heads.module_path, "input"), "heads_out": (heads.module_path, "output"),
                             "attn": (attn.module_path, "output"), "attn_in": (attn.module_path, "input")})
    problems = []
    n, d = heads.heads
    if got["heads_in"].shape[-1] != n * d:
        problems.append(f"the heads module takes {got['heads_in'].shape[-1]} features, not {n} x {d}")
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    try:
        n_cfg = getattr(cfg, "num_attention_heads", None)
    except Exception:  # noqa: BLE001 - per-layer attribute
        n_cfg = None
    if isinstance(n_cfg, int) and getattr(cfg, "per_layer_config", None) in (None, []) and n != n_cfg:
        problems.append(f"{n} heads, but the config says num_attention_heads={n_cfg}")
    ho = resid(got["heads_out"], h)
    if not (torch.equal(ho, resid(got["attn"], h)) or torch.equal(ho, resid(got["attn_in"], h))):
        problems.append("the heads module's output is neither the attention site's output nor what it reads")
    return problems


def declares_no_heads(model: torch.nn.Module) -> bool:
    """The config names no head count or head size at all (RWKV-4, Mamba-1)."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    keys = set(cfg.to_dict())
    return not any(k in keys for k in ("num_attention_heads", "num_heads", "n_head", "n_heads", "head_dim",
                                       "num_key_value_heads", "attention_head_size"))
