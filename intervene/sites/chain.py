"""Blocks the two-writer check cannot explain: the residual followed through the block, step by step.

A block's residual passes through *states*: its input, the values its submodules read (the next
branch's pre-norm reads the residual after the last add) and its output. A *chain* is a path of states
from input to output whose every step is an exact identity on the recorded float32 values::

    state_{k+1} = r * base + sum_j g_j * writer_j (+ c)

``base`` is the state itself or the output of a module reading it (MiniMax normalises the residual
before adding to it); the writers are submodule outputs that finished before the new state is read,
that no other submodule transforms, each in its own branch of the block and used once; ``r`` / ``g``
are constants or per-channel vectors (learned residual gates), ``c`` a per-channel constant (a bias
added outside the writer, as in GPT-NeoX-Japanese); :mod:`intervene.sites.fit` checks each step. Scaled and gated residuals (Beam, Doge, Ergo, Zaya, MiniMax), a third writer
(Gemma-4's per-layer input, Falcon-H1's Mamba beside attention) and one-writer blocks (Mamba,
Nemotron-H) all come out as chains; a chain is used only when it is the only one (up to skipped states).

Which writer is attention and which the MLP is then measured rather than read off names: a branch
*mixes tokens* (attention, or a state-space / convolutional mixer in its place) when one of its modules,
run alone with its input moved at position 0 only, moves at later positions; it acts on each position
alone (an MLP) when its modules do not and neither does its output with every state held at its
recorded value except at position 0 (:func:`mixes_tokens`). Among several token mixers the attention branch is the one
inside which a softmax over key positions ran. Accepted layouts: token mixers (one attention among
them) followed by per-position branches, the first of which is the MLP and any later one an extra
writer; two branches in sequence, the first mixing tokens and the second computing no attention (the
two-writer check's convention, attention then MLP: RWKV's channel mix shifts tokens by one); or a
single branch, in which case the part it is not is *absent* from that block (recorded apart from
"could not resolve", and only when nothing else in the block computes a branch).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from intervene.sites import probe
from intervene.sites.block import held_rerun, module_mixes, position0_noise
from intervene.sites.fit import Fit, fit_step, gain
from intervene.sites.residual import (
    Gain,
    Group,
    branch_members,
    computes_attention,
    gain_tensor,
    is_linear,
    pick,
    projection,
    top,
)

MAX_WRITERS_PER_STEP = 3
MAX_FITS = 4000  # per block: beyond this the block is refused as too tangled to check


@dataclass(frozen=True)
class Step:
    """One checked update of a block's residual: ``target = resid * base + Σ gains[j] * writers[j] (+ offset)``.

    ``target``: ``"output"`` (the block's) or ``"{path}:input"`` (the first module reading that state);
    ``base``: ``"input"`` (the block's), ``"{path}:input"`` (the previous state) or ``"{path}:output"``
    (a module reading the previous state, e.g. a norm). Paths are relative to the block; ``writers``
    are module paths whose outputs are added.
    """

    target: str
    base: str
    writers: tuple[str, ...]
    gains: tuple[Gain, ...]
    resid: Gain
    offset: tuple[float, ...] | None = None


@dataclass
class _Point:
    """A residual state: a value the block reads (or its input / output), and who reads it."""

    value: torch.Tensor
    read: float  # when first read: -1 for the block's input, inf for its output
    readers: list[str]
    name: str


# ---- states, writers and the chain --------------------------------------------------------------
def _points(rec: probe.Record, i: int, x: torch.Tensor, y: torch.Tensor) -> list[_Point]:
    """The block's input, every distinct residual-shaped value a submodule reads (in reading order),
    and its output."""
    pts = [_Point(x, -1.0, [], "input")]
    pre = f"{i}/"
    for key in sorted((k for k in rec.inp if k.startswith(pre)), key=lambda k: rec.read[k]):
        v, rel = rec.inp[key], key[len(pre):]
        if v.shape != x.shape:
            continue
        p = next((p for p in pts if torch.equal(p.value, v)), None)
        if p is None:
            pts.append(_Point(v, float(rec.read[key]), [rel], f"{rel}:input"))
        else:
            p.readers.append(rel)
    pts.append(_Point(y, math.inf, [], "output"))
    return pts


def _candidates(rec: probe.Record, i: int, found_groups: list[Group], pts: list[_Point], x: torch.Tensor,
                y: torch.Tensor, tol: float) -> list[Group]:
    """Groups that may be writers: visible, not the block's input or output, and read by no submodule
    that transforms them (a value something reads is a state or an intermediate, not a final write)."""
    out = []
    for g in found_groups:
        if g.value.shape != x.shape or float(g.value.abs().max()) <= 100 * tol:
            continue
        if torch.equal(g.value, x) or torch.equal(g.value, y):
            continue
        # read inside the block by something that transforms it (a post-norm reading o_proj, the MLP
        # reading a norm): an intermediate, not a write. Gates that compute the next residual from it
        # and the residual (Ergo's, Zaya's residual scaling) read two residual-shaped tensors: they do count.
        readers = [r for p in pts[1:-1] if torch.equal(p.value, g.value) for r in p.readers]
        if any(r not in g.members and f"{i}/{r}" not in rec.combines for r in readers):
            continue
        out.append(g)
    return out


def _bases(rec: probe.Record, i: int, state: _Point, cands: list[Group], before: float) -> list[tuple[str, torch.Tensor]]:
    """What a step may add to: the state itself, or the output of a module reading it (not a writer)."""
    out = [(state.name, state.value)]
    for rel in state.readers:
        key = f"{i}/{rel}"
        o = rec.out.get(key)
        if o is None or o.shape != state.value.shape or rec.order[key] >= before:
            continue
        if any(torch.equal(o, v) for _, v in out) or any(torch.equal(o, c.value) for c in cands):
            continue
        out.append((f"{rel}:output", o))
    return out


Chain = list[tuple[_Point, str, tuple[Group, ...], Fit]]  # (target state, base name, writers, fit)


def find_chains(rec: probe.Record, i: int, block: nn.Module, found_groups: list[Group], x: torch.Tensor,
                y: torch.Tensor, tol: float) -> tuple[list[Chain], list[_Point], str]:
    """Every chain from the block's input to its output (at most a few), the states, and a note when
    the search gave up."""
    pts = _points(rec, i, x, y)
    cands = _candidates(rec, i, found_groups, pts, x, y, tol)
    tops = {id(c): top(pick(c, block), block) for c in cands}
    chains: list[Chain] = []
    budget = [MAX_FITS]

    def go(state: _Point, used: tuple[Group, ...], steps: Chain) -> None:
        if state is pts[-1]:
            chains.append(steps)
            return
        for t in (p for p in pts if p.read > state.read):
            for bname, bval in _bases(rec, i, state, cands, t.read):
                # any writer not used yet that finished before the target is read: a shortcut branch
                # (LongCat-Flash's MoE) may be computed long before it is added
                window = [c for c in cands if c.order < t.read and all(c is not u for u in used)
                          and tops[id(c)] not in {tops[id(u)] for u in used}]
                for size in range(1, min(MAX_WRITERS_PER_STEP, len(window)) + 1):
                    for ws in itertools.combinations(window, size):
                        if len(chains) > 4 or budget[0] <= 0:
                            return
                        if len({tops[id(w)] for w in ws}) < size:
                            continue
                        budget[0] -= 1
                        f = fit_step(t.value, bval, [w.value for w in ws], tol)
                        if f is not None:
                            go(t, used + ws, steps + [(t, bname, ws, f)])

    go(pts[0], (), [])
    return chains, pts, ("" if budget[0] > 0 else f"gave up after {MAX_FITS} candidate steps")


# ---- which writer is which ----------------------------------------------------------------------
def mixes_tokens(block: nn.Module, i: int, call: tuple[tuple, dict], h: int, rec: probe.Record,
                 states: list[_Point], roots: dict[str, list[str]], tol: float) -> dict[str, bool | None]:
    """``{writer: mixes tokens?}`` from two measurements that must agree.

    The branch as a whole: one re-run with every state's readers held at the recorded value plus noise at
    position 0; a per-position branch's output does not move at later positions, a token mixer's does.
    Its modules alone (``roots[writer]``: the writer's outermost module, and for a post-norm the one whose
    output it normalises): re-run with their own input moved at position 0. A branch mixes tokens if one
    of its modules does; it acts per position only if its modules do and the held re-run agrees (a
    writer reading an intermediate that is not a state, e.g. Reformer's feed-forward reading attention's
    output, moves there for the upstream branch's sake: no answer then, and the block is refused).
    """
    hold: dict[str, torch.Tensor] = {}
    for s in states:
        held = position0_noise(s.value)  # one draw per state, shared by all its readers
        hold.update({f"{i}/{rel}": held for rel in s.readers})
    seen = held_rerun(block, i, call, h, hold)
    out: dict[str, bool | None] = {}
    for w, mods in roots.items():
        # a Linear acts on the last axis, so on each position alone, whatever it reads
        alone = [False if is_linear(block.get_submodule(m)) else module_mixes(block, i, m, rec, h) for m in mods]
        if any(a is True for a in alone):
            out[w] = True
            continue
        base, moved = rec.out.get(f"{i}/{w}"), seen.get(f"{i}/{w}")
        per_position = (all(a is False for a in alone) and base is not None and moved is not None
                        and moved.shape == base.shape and float((moved - base)[:, 0].abs().max()) > 100 * tol
                        and float((moved - base)[:, 1:].abs().max()) <= 1e-5 * float(base.abs().max()))
        out[w] = False if per_position else None
    return out


@dataclass
class _Writer:
    group: Group
    name: str
    step: int
    gain: Gain
    mixes: bool | None
    attention: bool


def assign(block: nn.Module, i: int, ws: list[_Writer]) -> tuple[dict[str, _Writer | None], dict[str, str], set[str]]:
    """``({"attn", "mlp"}: writer or None, {part: why unresolved}, parts absent by structure)`` from the
    measured kinds (see the module docstring for the layouts accepted)."""
    listing = ", ".join(f"{w.name} ({'mixes tokens' if w.mixes else 'per position' if w.mixes is False else '?'})"
                        for w in ws)
    if len(ws) == 2 and ws[0].step < ws[1].step and ws[0].mixes and not ws[1].attention:
        # two branches in sequence: the two-writer check's convention (attention, then the MLP), checked
        # here: the first mixes tokens and the second computes no attention (RWKV's channel mix shifts
        # tokens by one, yet it is the MLP)
        return {"attn": ws[0], "mlp": ws[1]}, {}, set()
    unclear = [w.name for w in ws if w.mixes is None]
    if unclear:
        why = (f"block {i}: could not tell whether {', '.join(unclear)} mixes tokens (its modules alone and the "
               f"block with its residual held disagree, e.g. it reads another branch's output rather than the "
               f"residual; its branches: {listing})")
        return {}, {"attn": why, "mlp": why}, set()
    mixers, pos = [w for w in ws if w.mixes], [w for w in ws if not w.mixes]
    first_pos = min((w.step for w in pos), default=math.inf)
    if any(w.step > first_pos for w in mixers):
        why = (f"block {i} writes {len(ws)} branches into its residual, token mixers after per-position ones "
               f"({listing}); the attention and MLP sites need attention branches followed by an MLP")
        return {}, {"attn": why, "mlp": why}, set()
    got: dict[str, _Writer | None] = {"attn": None, "mlp": None}
    missing: dict[str, str] = {}
    absent: set[str] = set()
    attention = [w for w in mixers if w.attention]
    if len(mixers) == 1:
        got["attn"] = mixers[0]
    elif len(attention) == 1:
        got["attn"] = attention[0]
    elif mixers:
        missing["attn"] = (f"block {i} has {len(mixers)} token-mixing branches ({listing}) and "
                           f"{len(attention)} of them compute attention, so none is the attention branch")
    else:
        absent.add("attn")
        names = ", ".join(f"{w.name} ({type(block.get_submodule(w.name)).__name__})" for w in pos)
        missing["attn"] = (f"block {i} has no attention: what writes its residual, {names}, acts on each "
                           "position alone")
    firsts = [w for w in pos if w.step == first_pos]
    if len(firsts) == 1:
        got["mlp"] = firsts[0]
    elif firsts:
        missing["mlp"] = (f"block {i}'s per-position branch is split across {', '.join(w.name for w in firsts)}, "
                          "added together in one step, and no submodule outputs their sum")
    else:
        absent.add("mlp")
        names = ", ".join(f"{w.name} ({type(block.get_submodule(w.name)).__name__})" for w in mixers)
        missing["mlp"] = (f"block {i} has no MLP: what writes its residual, {names}, mixes tokens (attention, or "
                          "a state-space or recurrent mixer in its place) and nothing acts on each position alone")
    return got, missing, absent


def unexplained(rec: probe.Record, i: int, block: nn.Module, found_groups: list[Group], ws: list[_Writer],
                chain: Chain, pts: list[_Point], tol: float) -> list[str]:
    """Branches the block computes that are neither writers nor inside one, nor feed one, nor a state:
    when there are any, a part missing from the residual is not absent from the architecture (Zamba's
    shared transformer feeds its Mamba mixer instead of writing the residual)."""
    roots: set[str] = set()
    for w in ws:
        roots.update(w.group.members)
        win = rec.inp.get(f"{i}/{w.name}")
        roots.update(m for g in found_groups if win is not None and torch.equal(g.value, win) for m in g.members)

    def under(rel: str) -> bool:
        return any(rel == r or rel.startswith(r + ".") for r in roots)

    states = [pts[0].value] + [t.value for t, *_ in chain]
    out = []
    for g in found_groups:
        if float(g.value.abs().max()) <= 100 * tol or all(under(m) for m in g.members):
            continue
        if any(torch.equal(g.value, s) for s in states):
            continue
        readers = [r for p in pts if torch.equal(p.value, g.value) for r in p.readers]
        if readers and all(under(r) for r in readers):
            continue  # a pre-norm: it feeds a writer
        name = top(pick(g, block), block)
        if name not in out:
            out.append(name)
    return out


def chain_writers(rec: probe.Record, i: int, block: nn.Module, found_groups: list[Group], x: torch.Tensor,
                  y: torch.Tensor, tol: float, call: tuple[tuple, dict] | None,
                  h: int) -> tuple[dict[str, Any], dict[str, str]]:
    """``(found, missing)`` for block ``i`` as :func:`intervene.sites.discovery._writers` returns them,
    from its unique chain; the reason in ``missing`` when there is none, or several."""
    chains, pts, gave_up = find_chains(rec, i, block, found_groups, x, y, tol)
    sets = {frozenset(id(g) for _, _, ws, _ in c for g in ws) for c in chains}
    if len(sets) != 1 or call is None:
        why = (f"block {i}: no submodule outputs add up to its output minus its input, nor reconstruct it step by "
               f"step from the values it reads (constants or per-channel gains{'; ' + gave_up if gave_up else ''})"
               if not chains else
               f"block {i}: several sets of submodule outputs reconstruct its output from its input")
        return {}, {"attn": why, "mlp": why}
    chain = max(chains, key=len)  # the same writers; the most states checked along the way
    roots: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}  # a writer's modules, with those it normalises for a post-norm
    for _, _, groups_k, _ in chain:
        for g in groups_k:
            name = pick(g, block)
            members[name] = branch_members(rec, i, block, found_groups, g)
            feeding = members[name][len(g.members):]
            roots[name] = [_outermost(g.members)] + ([_outermost(feeding)] if feeding else [])
    kinds = mixes_tokens(block, i, call, h, rec, [pts[0]] + [t for t, *_ in chain[:-1]], roots, tol)
    ws = []
    for k, (_, _, groups_k, f) in enumerate(chain):
        for g, g_gain in zip(groups_k, f.gains):
            name = pick(g, block)
            ws.append(_Writer(g, name, k, g_gain, kinds.get(name), computes_attention(rec, i, block, members[name])))
    got, missing, absent = assign(block, i, ws)
    if absent and (others := unexplained(rec, i, block, found_groups, ws, chain, pts, tol)):
        part = "attention" if "attn" in absent else "MLP"
        for p in absent:
            missing[p] = (f"block {i} writes only {', '.join(w.name for w in ws)} into its residual, but also "
                          f"computes {', '.join(others)}, which reach the residual only through it, so no {part} "
                          "branch of its own writes the residual stream")
        absent = set()
    found: dict[str, Any] = {
        "post_norm": False, "absent": absent, "offset": any(f.offset is not None for *_, f in chain),
        "normed": any(b.endswith(":output") for _, b, _, _ in chain),
        "extra": tuple(w.name for w in ws if w is not got.get("attn") and w is not got.get("mlp")),
        "steps": tuple(Step(t.name, b, tuple(pick(g, block) for g in gs), f.gains, f.resid, f.offset)
                       for t, b, gs, f in chain),
        "resid_gain": _resid_gain(chain, x.shape[-1]),
    }
    gains: list[Gain] = [1.0, 1.0]
    for k, part in enumerate(("attn", "mlp")):
        w = got.get(part)
        if w is None:
            continue
        found[part], gains[k] = w.name, w.gain
        if part == "attn":
            found["attention"] = w.attention  # whether the config's attention head count may apply
        proj, why = projection(rec, i, block, found_groups, w.name)
        if proj is None:
            missing[f"{part}_proj"] = why
        else:
            found[f"{part}_proj"] = proj
        if part == "mlp":
            found["mlp_last"] = w.step == len(chain) - 1
    found["gains"] = tuple(gains)
    return found, missing


def _outermost(members: list[str]) -> str:
    return min(members, key=lambda r: r.count("."))


def _resid_gain(chain: Chain, h: int) -> Gain | None:
    """How the block's input reaches its output along the chain (``None`` through a norm)."""
    if any(b.endswith(":output") for _, b, _, _ in chain):
        return None
    total = torch.ones(h, dtype=torch.float64)
    for *_, f in chain:
        total = total * gain_tensor(f.resid, h)
    return gain(total)
