"""One decoder block re-run on its own, in float32: the passes behind :mod:`intervene.sites.residual`.

:func:`rerun` repeats block ``i``'s call from the model's probe pass (:mod:`intervene.sites.probe`) and
records every descendant's residual-shaped input and output, when each was read and finished, and
which modules were running when a softmax over key positions (attention) was computed.
:func:`held_rerun` repeats it with chosen modules' inputs replaced, which is how a branch is tested for
mixing tokens: hold what its first module reads at the recorded value except at position 0, and see
whether its output moves at later positions.

The arithmetic is checked on float32 values: a bf16 sum cannot tell a writer from rounding. The
block's weights are viewed in float32 meanwhile (the original tensors are put back, untouched);
memory is one block's float32 copy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from intervene.sites.probe import (
    BATCH,
    PostHook,
    PreHook,
    Record,
    as_resid,
    eval_mode,
    first_tensor,
    module_input,
    replace_input,
)


def _to32(x: Any) -> Any:
    """``x`` with every floating tensor inside (tuples, lists, dicts) in float32."""
    if isinstance(x, torch.Tensor):
        return x.detach().float() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to32(v) for k, v in x.items()}
    return x


@contextmanager
def float32_view(block: nn.Module) -> Iterator[None]:
    """The block's floating parameters and buffers viewed as float32, the originals put back after."""
    saved = [(t, t.data) for t in itertools.chain(block.parameters(), block.buffers()) if t.is_floating_point()]
    try:
        for t, data in saved:
            t.data = data.float()
        yield
    finally:
        for t, data in saved:
            t.data = data


_ATTENTION_FNS = (F.softmax, torch.softmax, torch.Tensor.softmax, F.scaled_dot_product_attention)


class _AttentionWatch(TorchFunctionMode):
    """Records the modules running whenever a softmax (or fused attention) over ``[..., seq, keys]``
    scores with ``keys >= seq`` is computed: what attention does and a router's ``[tokens, experts]``
    softmax does not."""

    def __init__(self, seq: int, stack: list[str], hits: set[str]) -> None:
        super().__init__()
        self.seq, self.stack, self.hits = seq, stack, hits

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func in _ATTENTION_FNS and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            if t.ndim >= 3 and t.shape[-2] == self.seq and (func is F.scaled_dot_product_attention
                                                             or t.shape[-1] >= self.seq):
                self.hits.update(self.stack)
        return func(*args, **(kwargs or {}))


def rerun(block: nn.Module, i: int, call: tuple[tuple, dict], h: int) -> Record:
    """Block ``i`` run again on its own, in float32, with the arguments pass 1 gave it.

    Fills ``out`` / ``inp`` (residual-shaped outputs and inputs of every descendant, first call),
    ``order`` / ``read`` (one clock: when each finished / started), ``attention`` (descendants running
    during an attention softmax), ``combines`` (those given two residual-shaped tensors: a gate adding a
    branch to the residual) and ``block_in`` / ``block_out``.
    """
    rec = Record()
    tick = itertools.count()
    stack: list[str] = []

    def sub_pre(key: str) -> PreHook:
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            stack.append(key)
            t = module_input(args, kwargs, h)
            if key not in rec.inp and t is not None and (r := as_resid(t, h)) is not None:
                rec.inp[key], rec.read[key] = r, next(tick)
                # to re-run this module alone; its input cloned, as the block may add into it later
                rec.sub_args[key] = replace_input(args, kwargs, t.detach().clone())
                tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
                if sum(as_resid(v, h) is not None for v in tensors) >= 2:
                    rec.combines.add(key)
        return fn

    def sub_post(key: str) -> PostHook:
        def fn(_m: nn.Module, _a: tuple, out: Any) -> None:
            if stack and stack[-1] == key:
                stack.pop()
            if key not in rec.out and (r := as_resid(first_tensor(out), h)) is not None:
                rec.out[key], rec.order[key] = r, next(tick)
        return fn

    args, kwargs = _to32(call[0]), _to32(call[1])
    x = as_resid(module_input(args, kwargs, h), h)
    seq = x.shape[1] if x is not None else -1
    handles = []
    try:
        for rel, mod in block.named_modules():
            if rel:
                handles.append(mod.register_forward_pre_hook(sub_pre(f"{i}/{rel}"), with_kwargs=True, prepend=True))
                handles.append(mod.register_forward_hook(sub_post(f"{i}/{rel}")))
        with float32_view(block), torch.no_grad(), eval_mode(block), _AttentionWatch(seq, stack, rec.attention):
            out = block(*args, **kwargs)
        # absent (read back as None by .get) when not one [batch, seq, hidden] tensor
        if x is not None:
            rec.block_in[i] = x
        if (r := as_resid(first_tensor(out), h)) is not None:
            rec.block_out[i] = r
    finally:
        for handle in handles:
            handle.remove()
    return rec


def held_rerun(block: nn.Module, i: int, call: tuple[tuple, dict], h: int,
               hold: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block ``i`` re-run as in :func:`rerun`, with the main input of each module ``hold`` names
    (``"{i}/{path}"``) replaced by the given ``[BATCH, seq, hidden]`` value; returns every descendant's
    residual-shaped output (first call)."""
    seen: dict[str, torch.Tensor] = {}

    def pre(key: str) -> PreHook:
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            t = module_input(args, kwargs, h)
            if t is None:
                return None
            new = hold[key].reshape(t.shape).to(t.dtype)  # the module's own layout ([B*S, h] for some)
            return replace_input(args, kwargs, new)
        return fn

    def post(key: str) -> PostHook:
        def fn(_m: nn.Module, _a: tuple, out: Any) -> None:
            if key not in seen and (r := as_resid(first_tensor(out), h)) is not None:
                seen[key] = r
        return fn

    handles = []
    try:
        for rel, mod in block.named_modules():
            key = f"{i}/{rel}"
            if not rel:
                continue
            if key in hold:
                handles.append(mod.register_forward_pre_hook(pre(key), with_kwargs=True, prepend=True))
            handles.append(mod.register_forward_hook(post(key)))
        with float32_view(block), torch.no_grad(), eval_mode(block):
            block(*_to32(call[0]), **_to32(call[1]))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def module_mixes(block: nn.Module, i: int, rel: str, rec: Record, h: int) -> bool | None:
    """Does submodule ``rel`` of block ``i``, run alone on the call :func:`rerun` recorded, mix tokens: with
    its input changed at position 0 only, does its output move at later positions? (``None``: no
    recorded call, it failed alone, or no clear answer.)"""
    call = rec.sub_args.get(f"{i}/{rel}")
    t = None if call is None else module_input(*call, h)
    if call is None or t is None:
        return None
    mod = block.get_submodule(rel)
    moved = position0_noise(t.detach().double().reshape(BATCH, -1, h)).reshape(t.shape).to(t.dtype)
    args, kwargs = replace_input(*call, moved)
    try:
        with float32_view(block), torch.no_grad(), eval_mode(mod):
            a = as_resid(first_tensor(mod(*call[0], **call[1])), h)
            b = as_resid(first_tensor(mod(*args, **kwargs)), h)
    except Exception:  # noqa: BLE001 - a module that cannot run alone gives no answer, not a guess
        return None
    if a is None or b is None or a.shape != b.shape:
        return None
    d, scale = (b - a).abs(), float(a.abs().max())
    if float(d[:, 1:].max()) <= 1e-5 * scale:
        return False
    return True if float(d[:, 1:].max()) > 1e-3 * scale else None


def position0_noise(t: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """``t`` (``[BATCH, seq, hidden]``) plus noise of its own scale at position 0 of every row only."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.zeros_like(t)
    noise[:, 0] = torch.randn((BATCH, t.shape[-1]), generator=g, dtype=t.dtype) * (float(t.abs().max()) + 1e-3)
    return t + noise
