"""The probe forward passes behind :mod:`intervene.sites.discovery`: hooks that record, hold and perturb.

A probe is ``BATCH x SEQ`` low token ids run through the model in eval mode under ``no_grad``. Pass 1
(:func:`record`) keeps, per block, its input, output and call (which :mod:`intervene.sites.block`
re-runs alone to look inside it), plus the token embedding's output and the logits. Later passes
(:func:`perturb`) replace every block's input by the one pass 1 saw (so each block sees only its own
perturbation), add noise to chosen module outputs and record others: :func:`parallel_mlps` and
:func:`embedding_path` turn them into wiring facts. Activations are kept as float64
``[BATCH, seq, hidden]`` copies (modules that flatten tokens to ``[BATCH*seq, hidden]`` are viewed back).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from intervene.errors import UnsupportedModelError

BATCH, SEQ = 2, 6  # batch > 1 catches code that drops the batch axis

# The hooks :func:`run` registers: pre-hooks get ``(module, args, kwargs)`` and may return new
# ``(args, kwargs)``; post-hooks get ``(module, args, output)`` and may return a new output.
PreHook = Callable[[nn.Module, tuple, dict], "tuple[tuple, dict] | None"]
PostHook = Callable[[nn.Module, tuple, Any], Any]
Hook = tuple[nn.Module, Literal["pre", "post"], Callable[..., Any]]


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()`` (a ``transformers`` model's token embedding); ``None`` when the
    model has no such method or it returns no module."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb if isinstance(emb, nn.Module) else None


def weight_of(module: nn.Module | None) -> torch.Tensor | None:
    """``module.weight`` when it is a tensor, else ``None`` (``nn.Module.__getattr__`` types every attribute
    as ``Tensor | Module``; this checks which)."""
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def embedding_weight(model: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """The token embedding module and its ``[vocab, hidden]`` weight, which every probe goes through.

    Raises ``UnsupportedModelError`` when the model has none.
    """
    emb = input_embeddings(model)
    w = weight_of(emb)
    if emb is None or w is None or w.ndim != 2:
        raise UnsupportedModelError(f"{type(model).__name__} has no input embedding to probe it through")
    return emb, w


def first_tensor(x: Any) -> torch.Tensor | None:
    """``x`` if a tensor, else the first element of a tuple/list if that is one (block outputs vary)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def as_resid(t: torch.Tensor | None, h: int) -> torch.Tensor | None:
    """A float64 copy of ``t`` as ``[BATCH, seq, h]`` if it has the residual's shape, else ``None``.

    ``seq`` is usually ``SEQ``; some models prepend tokens of their own (CPM-Ant's prompt).
    """
    if t is None or t.ndim not in (2, 3) or t.shape[-1] != h or t.numel() % (BATCH * h) or t.shape[0] not in (BATCH, t.numel() // h):
        return None
    return t.detach().reshape(BATCH, -1, h).to(torch.float64, copy=True)  # copy: blocks add in place


def module_input(args: tuple, kwargs: dict, h: int) -> torch.Tensor | None:
    """A module's main input: the first positional argument, ``hidden_states=``, or a hidden-wide tensor kwarg."""
    t = first_tensor(args[0]) if args else kwargs.get("hidden_states")
    if t is None:
        t = next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.shape[-1:] == (h,)), None)
    return t


def replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the module's main input (see :func:`module_input`) replaced by ``new``."""
    if args:
        return (new, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else \
        next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.shape == new.shape)
    return args, {**kwargs, key: new}


@dataclass
class Record:
    """What a pass saw. Keys of ``out`` / ``inp`` / ``order`` / ``read`` are ``"{block}/{path in block}"``
    (filled by :func:`intervene.sites.block.rerun`; pass 1 records blocks, embeddings and logits only)."""

    block_in: dict[int, torch.Tensor] = field(default_factory=dict)
    block_out: dict[int, torch.Tensor] = field(default_factory=dict)
    raw_in: dict[int, torch.Tensor] = field(default_factory=dict)  # block inputs as the model passed them
    args: dict[int, tuple[tuple, dict]] = field(default_factory=dict)  # each block's call, to re-run it alone
    calls: dict[int, int] = field(default_factory=dict)
    out: dict[str, torch.Tensor] = field(default_factory=dict)
    inp: dict[str, torch.Tensor] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)  # when each module's forward finished
    read: dict[str, int] = field(default_factory=dict)  # when it started (same clock as ``order``)
    attention: set[str] = field(default_factory=set)  # modules running during an attention softmax
    combines: set[str] = field(default_factory=set)  # modules called with two residual-shaped tensors
    sub_args: dict[str, tuple[tuple, dict]] = field(default_factory=dict)  # each descendant's first call
    embed_out: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other embeddings' outputs (positions)
    logits: torch.Tensor | None = None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the probe, restoring each module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def probe_ids(model: nn.Module) -> torch.Tensor:
    """``[BATCH, SEQ]`` token ids below 200: special (image, pad) tokens sit at the top of most vocabularies."""
    _, w = embedding_weight(model)
    hi = max(4, min(int(w.shape[0]), 200))
    ids = (torch.arange(BATCH * SEQ).reshape(BATCH, SEQ) * 7 + 3) % (hi - 3) + 3
    return ids.to(w.device)


def run(model: nn.Module, hooks: list[Hook]) -> torch.Tensor | None:
    """One probe forward pass with ``(module, "pre"|"post", fn)`` hooks, all removed afterwards; returns
    the model's logits (its output's ``logits``, else its first tensor).

    Pre-hooks go first (``prepend``) so they see a module's input before anyone else's pre-hook edits it.
    """
    handles = []
    try:
        for mod, kind, fn in hooks:
            handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True, prepend=True) if kind == "pre"
                           else mod.register_forward_hook(fn))
        kw: dict[str, Any] = {"input_ids": probe_ids(model)}
        params = inspect.signature(model.forward).parameters
        if "use_cache" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kw["use_cache"] = False
        with torch.no_grad(), eval_mode(model):
            out = model(**kw)
        logits = getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):  # a bare base model: its last hidden state
            logits = first_tensor(out.to_tuple() if hasattr(out, "to_tuple") else out)
        return None if logits is None else logits.detach().clone()
    finally:
        for h in handles:
            h.remove()


def count_calls(model: nn.Module, modules: list[nn.Module]) -> list[int]:
    """How many times each of ``modules`` runs in one probe pass."""
    counts = [0] * len(modules)

    def counter(k: int) -> PreHook:
        def fn(_m: nn.Module, _a: tuple, _kw: dict) -> None:
            counts[k] += 1
        return fn

    run(model, [(m, "pre", counter(k)) for k, m in enumerate(modules)])
    return counts


def record(model: nn.Module, blocks: nn.ModuleList, emb: nn.Module, extras: Mapping[str, nn.Module],
           h: int) -> Record:
    """Pass 1, in the model's own dtype: each block's calls, input and output, and the arguments of
    its first call (kept by reference, to re-run it); the embedding's output; the logits."""
    rec = Record()

    def block_pre(i: int) -> PreHook:
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            rec.calls[i] = rec.calls.get(i, 0) + 1
            t = module_input(args, kwargs, h)
            if t is not None and i not in rec.raw_in:
                rec.raw_in[i] = t.detach().clone()
                rec.args[i] = (args, dict(kwargs))
                if (r := as_resid(t, h)) is not None:
                    rec.block_in[i] = r
        return fn

    def block_post(i: int) -> PostHook:
        def fn(_m: nn.Module, _a: tuple, out: Any) -> None:
            if i not in rec.block_out and (r := as_resid(first_tensor(out), h)) is not None:
                rec.block_out[i] = r
        return fn

    def extra_post(key: str) -> PostHook:
        def fn(_m: nn.Module, _a: tuple, out: Any) -> None:
            t = first_tensor(out)
            if t is not None and t.shape[-1] == h:
                rec.extra.setdefault(key, t.detach().to(torch.float64, copy=True))
        return fn

    def embed_post(_m: nn.Module, _a: tuple, out: Any) -> None:
        rec.embed_out = as_resid(first_tensor(out), h)

    hooks: list[Hook] = [(emb, "post", embed_post)]
    hooks += [(mod, "post", extra_post(name)) for name, mod in extras.items()]
    for i, block in enumerate(blocks):
        hooks += [(block, "pre", block_pre(i)), (block, "post", block_post(i))]
    rec.logits = run(model, hooks)
    return rec


def perturb(model: nn.Module, blocks: nn.ModuleList, rec: Record, noise: Mapping[nn.Module, torch.Tensor],
            watch: Mapping[str, nn.Module], h: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, bool]:
    """Pass 2: hold every block's input at ``rec.raw_in``, add ``noise[m]`` to module ``m``'s output.

    Returns the outputs of ``watch`` (``{name: module}``), what block 0 was given before being held,
    and whether the logits came out bit-identical to pass 1's.
    """
    seen: dict[str, torch.Tensor] = {}
    given0: list[torch.Tensor] = []

    def hold(i: int) -> PreHook:
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if i == 0 and not given0 and (r := as_resid(module_input(args, kwargs, h), h)) is not None:
                given0.append(r)
            return replace_input(args, kwargs, rec.raw_in[i])
        return fn

    def bump(delta: torch.Tensor) -> PostHook:
        def fn(_m: nn.Module, _a: tuple, out: Any) -> Any:
            t = first_tensor(out)
            if t is None or t.numel() != delta.numel():
                return None
            new = t + delta.reshape(t.shape).to(t.dtype)
            return new if isinstance(out, torch.Tensor) else type(out)((new, *out[1:]))
        return fn

    def grab(name: str) -> PostHook:
        def fn(_m: nn.Module, _a: tuple, out: Any) -> None:
            if name not in seen and (r := as_resid(first_tensor(out), h)) is not None:
                seen[name] = r
        return fn

    hooks: list[Hook] = [(b, "pre", hold(i)) for i, b in enumerate(blocks) if i in rec.raw_in]
    hooks += [(m, "post", bump(d)) for m, d in noise.items()]
    hooks += [(m, "post", grab(n)) for n, m in watch.items()]
    logits = run(model, hooks)
    same = rec.logits is not None and logits is not None and torch.equal(logits, rec.logits)
    return seen, (given0[0] if given0 else None), same


def tol(*ts: torch.Tensor | None, dtype: torch.dtype) -> float:
    """Rounding allowance for sums of these activations computed in ``dtype``."""
    scale = max((float(t.abs().max()) for t in ts if t is not None and t.numel()), default=1.0)
    return 16 * torch.finfo(dtype).eps * max(scale, 1e-6)


# ---- what the perturbation passes measure -------------------------------------------------------
def parallel_mlps(model: nn.Module, blocks: nn.ModuleList, rec: Record, writers: list[tuple[str, str] | None],
                  h: int) -> list[bool | None]:
    """Per block with ``(attn, mlp)`` writers: does the MLP read the block input rather than input +
    attention? Two passes with every block's input held, one adding noise to attention's output: a
    parallel MLP's output comes out bit-identical, a sequential one's moves (``None``: no writers, or
    no clear answer)."""
    g = torch.Generator().manual_seed(0)
    noise: dict[nn.Module, torch.Tensor] = {}
    watch: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        pair = writers[i]
        if pair is not None and i in rec.block_in:
            scale = float(rec.block_in[i].abs().max()) + 1e-3
            noise[block.get_submodule(pair[0])] = torch.randn(rec.block_in[i].shape, generator=g,
                                                              dtype=torch.float64) * scale
            watch[str(i)] = block.get_submodule(pair[1])
    if not watch:
        return [None] * len(blocks)
    base, _, _ = perturb(model, blocks, rec, {}, watch, h)
    seen, _, _ = perturb(model, blocks, rec, noise, watch, h)
    parallel: list[bool | None] = []
    for i in range(len(blocks)):
        if str(i) not in seen or str(i) not in base:
            parallel.append(None)
            continue
        moved = float((seen[str(i)] - base[str(i)]).abs().max())
        parallel.append(True if moved == 0.0 else False if moved > 1e-3 * float(base[str(i)].abs().max()) else None)
    return parallel


def _embed_pass(model: nn.Module, blocks: nn.ModuleList, rec: Record, emb: nn.Module,
                h: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(block 0's input change, embedding output change) with every block's input held, or why the
    embedding cannot be edited as block 0's input: it also feeds something else (Gemma-4's per-layer
    inputs are computed from it), which the logits moving betrays."""
    if rec.embed_out is None or 0 not in rec.block_in:
        return "the embedding output or block 0's input is not one [batch, seq, hidden] tensor"
    g = torch.Generator().manual_seed(1)
    e_delta = torch.randn(rec.embed_out.shape, generator=g, dtype=torch.float64) * (
        float(rec.embed_out.abs().max()) + 1e-3)
    _, given0, same = perturb(model, blocks, rec, {emb: e_delta}, {}, h)
    if not same:
        return "the embedding output reaches more than block 0's input (the logits move with block 0's input held)"
    if given0 is None:
        return "block 0's input is not one [batch, seq, hidden] tensor"
    return given0 - rec.block_in[0], e_delta


def scalar(target: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, ref: torch.Tensor | None = None) -> float | None:
    """``s`` with ``target = s * base`` to within a few roundings in ``dtype`` of each element, else
    ``None`` (exactly 1.0 when that fits). ``ref``: magnitudes the rounding happened at (default ``target``)."""
    if target.shape != base.shape or not bool(base.abs().max() > 0):
        return None
    s = float((target * base).sum() / (base * base).sum())
    s = 1.0 if abs(s - 1.0) < 1e-3 and bool(((target - base).abs() <= _ulps(target, base, ref, dtype)).all()) else s
    if abs(s) < 1e-6 or not bool(((target - s * base).abs() <= _ulps(target, s * base, ref, dtype)).all()):
        return None
    return s


def _ulps(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Per element: a few roundings in ``dtype`` at the magnitudes involved."""
    mag = a.abs() + b.abs() + (ref.abs() if ref is not None else 0)
    return 8 * torch.finfo(dtype).eps * mag + 1e-30


def embedding_path(model: nn.Module, blocks: nn.ModuleList, rec: Record, emb: nn.Module,
                   h: int) -> tuple[float | None, str | None, bool]:
    """(gain from an embedding row to block 0's input, position-embedding path, unexplained offset).

    Two factors, both checked to be exact scalars: the embedding module's own (Gemma's sqrt(hidden);
    a normed embedding has none) and what happens between it and block 0 (Granite's multiplier),
    measured by pass 3 (:func:`_embed_pass`). Positions: a learned embedding outside the blocks whose
    output is what block 0 gets besides the token rows.
    """
    moved = _embed_pass(model, blocks, rec, emb, h)
    weight = weight_of(emb)
    if weight is None:
        raise UnsupportedModelError(f"{type(model).__name__}'s input embedding has no weight to probe it through")
    dtype = weight.dtype
    rows = weight.detach()[probe_ids(model)].to(torch.float64)
    embed_out = rec.embed_out
    inner = None if embed_out is None else scalar(embed_out, rows, dtype)
    # roundings happened at the magnitudes of block 0's input and of the embedding (they may cancel)
    ref = None if embed_out is None else rec.block_in[0].abs() + embed_out.abs()
    outer = None if isinstance(moved, str) else scalar(moved[0], moved[1], dtype, ref=ref)
    if embed_out is None or inner is None or outer is None:
        return None, None, True  # not linear: a norm (or more) between the rows and block 0
    x0, e = rec.block_in[0], outer * embed_out
    t = _ulps(x0, e, None, dtype)
    offset = x0 - e
    if bool((offset.abs() <= t).all()):
        return inner * outer, None, False
    for name, out in rec.extra.items():
        try:
            if bool(((offset - out.expand_as(offset)).abs() <= t + _ulps(out.expand_as(offset), out.expand_as(offset),
                                                                           None, dtype)).all()):
                return inner * outer, name, False
        except RuntimeError:  # not broadcastable to [batch, seq, hidden]
            continue
    return inner * outer, None, True
