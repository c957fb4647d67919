"""Find an unknown causal LM's blocks, residual writers and attention output projection, and check them.

Used by :mod:`intervene.sites` for every ``config.model_type`` that is not in its table. Nothing is
guessed from names alone: candidates come from the module tree, and a probe forward pass on a few
tokens decides.

1. **Blocks**: the ``ModuleList`` inside ``get_decoder()`` whose elements are the classes named in
   ``_no_split_modules`` (else ``GradientCheckpointingLayer`` subclasses, else as many as
   ``num_hidden_layers``). Checked: each block runs once, and block ``i``'s output is block ``i+1``'s input.
2. **Residual writers**: for block ``i``, the two submodules (attention first) whose outputs sum to
   ``output - input``. Among modules with the same output value the last Linear-like one is named
   (``self_attn.o_proj`` rather than ``self_attn``), else the outermost (a whole MoE block). A writer
   that is not Linear-like (a post-norm) gets a *projection*: the Linear whose output it reads.
3. **Heads**: the attention projection's input, ``in_features = n_heads * head_dim``, with ``n_heads``
   from the attention module or the (per-layer) config; ``head_dim`` only when it divides exactly.
4. **Wiring**: a second pass holds every block's input fixed and perturbs attention's output; the
   MLP's input moving means sequential, staying bit-identical means parallel. The same pass
   perturbs the token embedding and measures how block 0's input follows (``embed_gain``; ``None``
   when a non-linear map such as a norm sits between them).

Anything that cannot be resolved is recorded per layer with the reason; :mod:`intervene.sites` turns it
into a ``SiteError`` for the sites that need it. A structure that fails the checks raises
``UnsupportedModelError``.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from intervene.errors import UnsupportedModelError

_BATCH, _SEQ = 2, 6  # a probe of 2 x 6 tokens: batch > 1 catches code that drops the batch axis


@dataclass(frozen=True)
class LayerParts:
    """What block ``i`` writes into the residual stream; paths are relative to the block.

    ``attn`` / ``mlp``: modules whose outputs are added to the residual (``out = in + attn + mlp``).
    ``attn_proj`` / ``mlp_proj``: the Linear-like module producing that value, before any post-norm
    (equal to the writer when there is none); ``attn_proj``'s input is the heads site.
    ``heads``: ``(n_heads, head_dim)`` of ``attn_proj``'s input. ``parallel``: the MLP reads the block
    input rather than input + attention. ``missing``: ``{"block"|"attn"|"mlp"|"heads": why}``.
    """

    attn: str | None = None
    mlp: str | None = None
    attn_proj: str | None = None
    mlp_proj: str | None = None
    heads: tuple[int, int] | None = None
    parallel: bool | None = None
    missing: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Discovered:
    """A model's structure as found and checked by :func:`discover`.

    ``layers``: path of the block list on the model. ``embed``: path of the token embedding.
    ``embed_gain``: how much block 0's input moves per unit change of the embedding output (``None``:
    not linearly). ``pos_embed``: a learned position embedding added before block 0, if any;
    ``embed_offset``: something else (unidentified) is added there.
    """

    layers: str
    parts: tuple[LayerParts, ...]
    embed: str | None = None
    embed_gain: float | None = None
    pos_embed: str | None = None
    embed_offset: bool = False


_CACHE: weakref.WeakKeyDictionary[nn.Module, Discovered] = weakref.WeakKeyDictionary()


def discover(model: nn.Module) -> Discovered:
    """The checked structure of ``model`` (found once per model object, then cached)."""
    found = _CACHE.get(model)
    if found is None:
        found = _CACHE[model] = _discover(model)
    return found


# ---- small helpers ------------------------------------------------------------------------------
def first_tensor(x: Any) -> torch.Tensor | None:
    """``x`` if a tensor, else the first element of a tuple/list if that is one (block outputs vary)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def is_linear(module: nn.Module) -> bool:
    """A Linear-like module: ``nn.Linear``, GPT-2's ``Conv1D``, or anything with a 2-D weight and in/out sizes."""
    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return False
    return type(module).__name__ == "Conv1D" or isinstance(getattr(module, "in_features", None), int)


def in_features(module: nn.Module) -> int | None:
    """Width of a Linear-like module's input (GPT-2's ``Conv1D`` stores its weight as ``[in, out]``)."""
    if isinstance(getattr(module, "in_features", None), int):
        return int(module.in_features)
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 2 and type(module).__name__ == "Conv1D":
        return int(w.shape[0])
    return None


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    try:
        return cfg.get_text_config(decoder=True)
    except Exception:  # noqa: BLE001 - older configs, or several candidate sub-configs
        return cfg


def _cfg_int(cfg: Any, names: tuple[str, ...]) -> int | None:
    """First of ``names`` that ``cfg`` holds as a plain int (per-layer attributes raise on global access)."""
    for n in names:
        try:
            v = getattr(cfg, n, None)
        except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError
            continue
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _hidden(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 2:
        return int(w.shape[1])
    h = _cfg_int(_text_config(model), ("hidden_size", "n_embd", "d_model"))
    if h is None:
        raise UnsupportedModelError(f"{type(model).__name__}: neither an input embedding nor a hidden size in the "
                                    "config, so the residual width is unknown")
    return h


# ---- 1. the block list --------------------------------------------------------------------------
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Path and module of the decoder block list (not yet checked; :func:`discover` checks it)."""
    try:
        dec = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else model
    except Exception:  # noqa: BLE001 - some wrappers raise instead of returning self
        dec = model
    names = {id(m): n for n, m in model.named_modules()}
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    n_cfg = _cfg_int(_text_config(model), ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    # the decoder's subtree first (vision towers share the hints); the whole model if it has none
    roots = [dec, model] if isinstance(dec, nn.Module) and dec is not model else [model]
    best = next((b for b in (_best_list(r, names, no_split, n_cfg) for r in roots) if b is not None), None)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no decoder block list (a ModuleList of the classes in _no_split_modules "
            f"{sorted(no_split)}, of GradientCheckpointingLayer, or of num_hidden_layers={n_cfg} modules). Use raw "
            "module paths as sites, or teach it with intervene.register_family().")
    return names[id(best)], best


def _best_list(root: nn.Module, names: dict[int, str], no_split: set[str], n_cfg: int | None) -> nn.ModuleList | None:
    """The ``ModuleList`` under ``root`` meeting most block hints, then holding most parameters."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer as Gc
    except ImportError:  # older transformers
        Gc = None  # noqa: N806
    best, best_key = None, None
    for mod in root.modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or id(mod) not in names:
            continue
        hints = (all(type(b).__name__ in no_split for b in mod), Gc is not None and all(isinstance(b, Gc) for b in mod),
                 len(mod) == n_cfg)
        key = (sum(hints), sum(p.numel() for p in mod.parameters()))
        if any(hints) and (best_key is None or key > best_key):
            best, best_key = mod, key
    return best


# ---- the probe ----------------------------------------------------------------------------------
@dataclass
class _Capture:
    """What one probe pass saw: block inputs/outputs and every descendant's output/input of residual shape."""

    block_in: dict[int, torch.Tensor] = field(default_factory=dict)
    block_out: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)
    out: dict[str, torch.Tensor] = field(default_factory=dict)  # "i/rel.path" -> [B, T, H]
    inp: dict[str, torch.Tensor] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)  # when its forward finished
    embed_out: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other embeddings' outputs


def _as_resid(t: torch.Tensor | None, h: int) -> torch.Tensor | None:
    """``t`` viewed as ``[B, T, H]`` if it is a residual-shaped activation of the probe, else ``None``."""
    if t is None or t.shape[-1] != h or t.numel() != _BATCH * _SEQ * h:
        return None
    return t.detach().reshape(_BATCH, _SEQ, h).to(torch.float64)


def _block_input(args: tuple, kwargs: dict, h: int) -> torch.Tensor | None:
    t = first_tensor(args[0]) if args else kwargs.get("hidden_states")
    if t is None:
        t = next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.shape[-1:] == (h,)), None)
    return t


def _replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": new}
    key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.shape == new.shape)
    return args, {**kwargs, key: new}


def _replace_output(out: Any, new: torch.Tensor) -> Any:
    return new if isinstance(out, torch.Tensor) else type(out)((new, *out[1:]))


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the probe, restoring each module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def _run(model: nn.Module, blocks: nn.ModuleList, hooks: list, ids: torch.Tensor) -> None:
    handles = []
    try:
        for mod, kind, fn in hooks:
            if kind == "pre":
                handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True, prepend=True))
            else:
                handles.append(mod.register_forward_hook(fn))
        kw: dict[str, Any] = {"input_ids": ids}
        params = inspect.signature(model.forward).parameters
        if "use_cache" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kw["use_cache"] = False
        with torch.no_grad(), _eval_mode(model):
            model(**kw)
    finally:
        for h in handles:
            h.remove()


def _probe_ids(model: nn.Module) -> torch.Tensor:
    emb = model.get_input_embeddings()
    vocab = int(emb.weight.shape[0]) if isinstance(getattr(emb, "weight", None), torch.Tensor) else 100
    hi = max(4, min(vocab, 200))  # low ids: special (image, pad) tokens sit at the top of most vocabularies
    ids = (torch.arange(_BATCH * _SEQ).reshape(_BATCH, _SEQ) * 7 + 3) % (hi - 3) + 3
    return ids.to(emb.weight.device)


def _capture_hooks(cap: _Capture, blocks: nn.ModuleList, emb: nn.Module, extras: dict[str, nn.Module],
                   h: int) -> list:
    """(module, "pre"|"post", fn) hooks that fill ``cap`` during one forward pass."""
    tick = itertools.count()
    hooks: list = []

    def block_pre(i: int):
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            cap.calls[i] = cap.calls.get(i, 0) + 1
            t = _as_resid(_block_input(args, kwargs, h), h)
            if t is not None:
                cap.block_in.setdefault(i, t)
        return fn

    def block_post(i: int):
        def fn(_m: nn.Module, _a: tuple, out: Any) -> None:
            t = _as_resid(first_tensor(out), h)
            if t is not None:
                cap.block_out.setdefault(i, t)
        return fn

    def sub_pre(key: str):
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            t = _as_resid(_block_input(args, kwargs, h), h)
            if t is not None:
                cap.inp.setdefault(key, t)
        return fn

    def sub_post(key: str):
        def fn(_m: nn.Module, _a: tuple, out: Any) -> None:
            t = _as_resid(first_tensor(out), h)
            if t is not None and key not in cap.out:
                cap.out[key], cap.order[key] = t, next(tick)
        return fn

    def extra_post(key: str):
        def fn(_m: nn.Module, _a: tuple, out: Any) -> None:
            t = first_tensor(out)
            if t is not None and t.shape[-1] == h:
                cap.extra.setdefault(key, t.detach().to(torch.float64))
        return fn

    def embed_post(_m: nn.Module, _a: tuple, out: Any) -> None:
        cap.embed_out = _as_resid(first_tensor(out), h)

    for i, block in enumerate(blocks):
        hooks += [(block, "pre", block_pre(i)), (block, "post", block_post(i))]
        for rel, mod in block.named_modules():
            if rel:
                hooks += [(mod, "pre", sub_pre(f"{i}/{rel}")), (mod, "post", sub_post(f"{i}/{rel}"))]
    hooks.append((emb, "post", embed_post))
    hooks += [(mod, "post", extra_post(name)) for name, mod in extras.items()]
    return hooks


def _tol(*ts: torch.Tensor | None, dtype: torch.dtype) -> float:
    """Rounding allowance for sums of these activations computed in ``dtype``."""
    scale = max((float(t.abs().max()) for t in ts if t is not None and t.numel()), default=1.0)
    return 16 * torch.finfo(dtype).eps * max(scale, 1e-6)


# ---- 2. residual writers ------------------------------------------------------------------------
@dataclass
class _Group:
    """Submodules of one block whose outputs are the same tensor values."""

    value: torch.Tensor
    members: list[str]
    order: int


def _groups(cap: _Capture, i: int, rels: list[str]) -> list[_Group]:
    groups: list[_Group] = []
    for rel in sorted((r for r in rels if f"{i}/{r}" in cap.out), key=lambda r: cap.order[f"{i}/{r}"]):
        v = cap.out[f"{i}/{rel}"]
        g = next((g for g in groups if torch.equal(g.value, v)), None)
        if g is None:
            groups.append(_Group(v, [rel], cap.order[f"{i}/{rel}"]))
        else:
            g.members.append(rel)
    return groups


def _pick(members: list[str], block: nn.Module) -> str:
    """The name for a group: its last Linear-like member, else its outermost (an MoE block, say)."""
    lin = [r for r in members if is_linear(block.get_submodule(r))]
    return lin[-1] if lin else min(members, key=lambda r: r.count("."))


def _top(rel: str) -> str:
    return rel.split(".", 1)[0]


def _writers(cap: _Capture, i: int, block: nn.Module, dtype: torch.dtype) -> tuple[dict[str, str], dict[str, str]]:
    """``({"attn"|"mlp"|"attn_proj"|"mlp_proj": rel path}, {part: why missing})`` for block ``i``."""
    x, y = cap.block_in.get(i), cap.block_out.get(i)
    if x is None or y is None:
        why = f"block {i} does not take and return one [batch, seq, hidden] tensor"
        return {}, {"attn": why, "mlp": why}
    rels = [r for r, _ in block.named_modules() if r]
    groups = _groups(cap, i, rels)
    delta = y - x
    tol = _tol(x, y, *(g.value for g in groups), dtype=dtype)
    live = [g for g in groups if float(g.value.abs().max()) > 100 * tol]  # a writer must be visible
    # the two writers live in different children of the block: two halves of one MoE are not attn + MLP
    pairs = [(a, m) for a, m in itertools.combinations(live, 2)
             if _top(_pick(a.members, block)) != _top(_pick(m.members, block))
             and float((delta - a.value - m.value).abs().max()) <= tol]
    if len(pairs) != 1:
        single = [g for g in live if float((delta - g.value).abs().max()) <= tol]
        why = (f"block {i} writes one thing into the residual ({_pick(single[0].members, block)}); "
               "attention and MLP sites need two" if single else
               f"block {i}: several pairs of submodules add up to its output minus its input" if pairs else
               f"block {i}: no two submodule outputs add up to its output minus its input (a scaled or "
               "gated residual branch, or more than two writers)")
        return {}, {"attn": why, "mlp": why}
    found: dict[str, str] = {}
    missing: dict[str, str] = {}
    for part, g in zip(("attn", "mlp"), sorted(pairs[0], key=lambda g: g.order)):
        found[part] = _pick(g.members, block)
        writer = block.get_submodule(found[part])
        if is_linear(writer):
            found[f"{part}_proj"] = found[part]
            continue
        win = cap.inp.get(f"{i}/{found[part]}")
        src = next((grp for grp in groups if win is not None and torch.equal(grp.value, win)), None)
        lin = [r for r in (src.members if src else []) if is_linear(block.get_submodule(r))]
        if lin:
            found[f"{part}_proj"] = lin[-1]  # a post-norm (or short conv): the projection whose output it reads
        else:
            missing[f"{part}_proj"] = (f"{found[part]} ({type(writer).__name__}) is not a Linear layer and "
                                       "reads no Linear layer's output")
    return found, missing


# ---- 3. heads -----------------------------------------------------------------------------------
_N_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_v_heads")
_HEAD_DIM = ("head_dim", "v_head_dim", "head_v_dim", "head_size")


def _layer_config(model: nn.Module, i: int) -> Any:
    cfg = _text_config(model)
    try:
        per = getattr(cfg, "per_layer_config", None)
        return per[i] if per is not None and len(per) > i else cfg
    except Exception:  # noqa: BLE001
        return cfg


def _heads(model: nn.Module, block: nn.Module, i: int, proj: str) -> tuple[tuple[int, int] | None, str]:
    """``(n_heads, head_dim)`` of the input of ``proj`` (or ``None`` and why)."""
    width = in_features(block.get_submodule(proj))
    if width is None:
        return None, f"{proj} has no in_features"
    owners = [block.get_submodule(proj.rsplit(".", k)[0]) for k in range(1, proj.count(".") + 1)] + [block]
    n_mod = next((n for m in owners if (n := _cfg_int(m, _N_HEADS)) is not None), None)
    hd_mod = next((d for m in owners if (d := _cfg_int(m, _HEAD_DIM)) is not None), None)
    lcfg = _layer_config(model, i)
    per_layer = getattr(lcfg, "num_attention_heads_per_layer", None)
    n_cfg = per_layer[i] if isinstance(per_layer, (list, tuple)) and len(per_layer) > i else \
        _cfg_int(lcfg, ("num_attention_heads", "n_head", "num_heads", "n_heads"))
    for n in (n_mod, n_cfg):
        if n and width % n == 0 and (hd_mod is None or width // n == hd_mod or n == n_mod):
            return (n, width // n), ""
    if n_mod is None and n_cfg is None and hd_mod and width % hd_mod == 0:
        return (width // hd_mod, hd_mod), ""
    return None, (f"{proj} takes {width} inputs, which is not n_heads x head_dim for n_heads "
                  f"{n_mod or n_cfg} / head_dim {hd_mod} (from the attention module and config)")


# ---- 4. wiring: parallel blocks, the embedding's path to block 0 --------------------------------
def _wiring(model: nn.Module, blocks: nn.ModuleList, base: _Capture, raw_in: dict[int, torch.Tensor],
            found: list[dict[str, str]], emb: nn.Module, ids: torch.Tensor, h: int,
            dtype: torch.dtype) -> tuple[list[bool | None], torch.Tensor | None]:
    """Per block: is the MLP parallel to attention? And block 0's input with the embedding perturbed.

    Every block's input is replaced by its recorded probe input, so each block sees only its own
    perturbation (of attention's output): the MLP's output moves iff the MLP reads attention's output.
    """
    g = torch.Generator().manual_seed(0)
    mlp_out: dict[int, torch.Tensor] = {}
    seen0: list[torch.Tensor] = []
    hooks: list = []

    def hold(i: int):
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if i == 0:
                t = _as_resid(_block_input(args, kwargs, h), h)
                if t is not None and not seen0:
                    seen0.append(t)
            return _replace_input(args, kwargs, raw_in[i])
        return fn

    def bump(delta: torch.Tensor):
        def fn(_m: nn.Module, _a: tuple, out: Any) -> Any:
            t = first_tensor(out)
            return None if t is None or t.numel() != delta.numel() else \
                _replace_output(out, t + delta.reshape(t.shape).to(t.dtype))
        return fn

    def grab(i: int):
        def fn(_m: nn.Module, _a: tuple, out: Any) -> None:
            t = _as_resid(first_tensor(out), h)
            if t is not None:
                mlp_out.setdefault(i, t)
        return fn

    for i, block in enumerate(blocks):
        if i in raw_in:
            hooks.append((block, "pre", hold(i)))
        if "attn" in found[i] and "mlp" in found[i]:
            a = base.out[f"{i}/{found[i]['attn']}"]
            scale = float(a.abs().max()) + float(base.block_in[i].abs().max())
            hooks.append((block.get_submodule(found[i]["attn"]), "post",
                          bump(torch.randn(a.shape, generator=g, dtype=torch.float64) * scale)))
            hooks.append((block.get_submodule(found[i]["mlp"]), "post", grab(i)))
    e_delta = None
    if base.embed_out is not None:
        e_delta = torch.randn(base.embed_out.shape, generator=g, dtype=torch.float64) * (
            float(base.embed_out.abs().max()) + 1e-3)
        hooks.append((emb, "post", bump(e_delta)))
    _run(model, blocks, hooks, ids)
    parallel: list[bool | None] = []
    for i in range(len(blocks)):
        if i not in mlp_out:
            parallel.append(None)
            continue
        m0 = base.out[f"{i}/{found[i]['mlp']}"]
        moved = float((mlp_out[i] - m0).abs().max())
        tol = _tol(m0, mlp_out[i], dtype=dtype)
        parallel.append(True if moved <= tol else False if moved > 100 * tol else None)
    moved0 = seen0[0] - base.block_in[0] if seen0 and 0 in base.block_in else None
    return parallel, (None if e_delta is None or moved0 is None else torch.stack([moved0, e_delta]))


def _embed_facts(model: nn.Module, base: _Capture, moved: torch.Tensor | None,
                 names: dict[int, str], dtype: torch.dtype) -> tuple[float | None, str | None, bool]:
    """(gain of block 0's input per unit of embedding output, position-embedding path, unexplained offset)."""
    if moved is None or base.embed_out is None or 0 not in base.block_in:
        return None, None, True
    d_in, d_emb = moved[0], moved[1]
    gain = float((d_in * d_emb).sum() / (d_emb * d_emb).sum())
    if float((d_in - gain * d_emb).abs().max()) > _tol(d_in, gain * d_emb, dtype=dtype) * 4 or abs(gain) < 1e-6:
        return None, None, True  # not linear: a norm (or more) between the embedding and block 0
    gain = 1.0 if abs(gain - 1.0) < 1e-5 else gain
    offset = base.block_in[0] - gain * base.embed_out
    tol = _tol(base.block_in[0], base.embed_out, dtype=dtype) * 4
    if float(offset.abs().max()) <= tol:
        return gain, None, False
    for name, out in base.extra.items():
        try:
            if float((offset - out.expand_as(offset)).abs().max()) <= tol:
                return gain, name, False
        except RuntimeError:  # not broadcastable to [batch, seq, hidden]
            continue
    return gain, None, True


# ---- putting it together -------------------------------------------------------------------------
def _discover(model: nn.Module) -> Discovered:
    name = type(model).__name__
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise UnsupportedModelError(f"{name} has no input embedding to probe it through")
    if any(p.is_meta for p in model.parameters()):
        raise UnsupportedModelError(f"{name}'s weights are on the meta device; its structure is checked with a "
                                    "forward pass, so load the weights (or use raw module paths)")
    path, blocks = find_blocks(model)
    h = _hidden(model)
    emb = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    inside = {id(m) for b in blocks for m in b.modules()}
    extras = {names[id(m)]: m for m in model.modules()
              if isinstance(m, nn.Embedding) and m is not emb and id(m) not in inside and id(m) in names}
    ids = _probe_ids(model)
    base = _Capture()
    raw_in: dict[int, torch.Tensor] = {}

    def keep_raw(i: int):
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            t = _block_input(args, kwargs, h)
            if t is not None and i not in raw_in:
                raw_in[i] = t.detach().clone()
        return fn

    hooks = _capture_hooks(base, blocks, emb, extras, h) + [(b, "pre", keep_raw(i)) for i, b in enumerate(blocks)]
    try:
        _run(model, blocks, hooks, ids)
    except Exception as e:
        raise UnsupportedModelError(f"{name}: the self-check forward pass on {_BATCH}x{_SEQ} token ids failed "
                                    f"({type(e).__name__}: {e}); use raw module paths or intervene.register_family()"
                                    ) from e
    dtype = next(iter(raw_in.values())).dtype if raw_in else torch.float32
    once = _check_chain(name, path, base, len(blocks), dtype)
    found, missing = [], []
    for i, block in enumerate(blocks):
        if i not in once:
            why = once.get(-1 - i, f"block {i} did not run during a text-only forward pass")
            found.append({})
            missing.append({"block": why, "attn": why, "mlp": why, "heads": why})
            continue
        f, m = _writers(base, i, block, dtype)
        found.append(f)
        missing.append(m)
    try:
        parallel, moved = _wiring(model, blocks, base, {i: raw_in[i] for i in once if i in raw_in}, found, emb,
                                  ids, h, dtype)
    except Exception as e:
        raise UnsupportedModelError(f"{name}: the self-check's second pass (inputs held fixed) failed "
                                    f"({type(e).__name__}: {e})") from e
    parts = []
    for i, block in enumerate(blocks):
        f, m = found[i], dict(missing[i])
        heads = None
        if "attn_proj" in f:
            heads, why = _heads(model, block, i, f["attn_proj"])
            if heads is None:
                m["heads"] = why
        else:
            m.setdefault("heads", m.get("attn_proj") or m.get("attn") or "no attention output projection")
        parts.append(LayerParts(f.get("attn"), f.get("mlp"), f.get("attn_proj"), f.get("mlp_proj"), heads,
                                parallel[i], m))
    gain, pos, offset = _embed_facts(model, base, moved, names, dtype)
    return Discovered(path, tuple(parts), names.get(id(emb)), gain, pos, offset)


def _check_chain(name: str, path: str, cap: _Capture, n: int, dtype: torch.dtype) -> dict[int, Any]:
    """Blocks that ran exactly once (keys ``i``) plus why others are out (keys ``-1 - i``).

    Raises ``UnsupportedModelError`` when block ``i``'s output is not block ``i+1``'s input.
    """
    once: dict[int, Any] = {}
    for i in range(n):
        k = cap.calls.get(i, 0)
        if k == 1:
            once[i] = True
        elif k > 1:
            once[-1 - i] = (f"block {i} runs {k} times per forward pass (a looped stack), so an edit there would "
                            f"apply {k} times")
    if not any(i >= 0 for i in once):
        raise UnsupportedModelError(f"{name}: no block of {path} ran exactly once during the self-check forward pass")
    for i in range(n - 1):
        if i in once and i + 1 in once:
            a, b = cap.block_out.get(i), cap.block_in.get(i + 1)
            if a is None or b is None or float((a - b).abs().max()) > _tol(a, b, dtype=dtype):
                raise UnsupportedModelError(
                    f"{name}: {path}.{i}'s output is not {path}.{i + 1}'s input, so {path} is not one residual "
                    "stream (something runs between blocks, or the blocks do not return the hidden state "
                    "first); use raw module paths or intervene.register_family()")
    return once
