"""What a block writes into its residual stream: the two-writer checks, and helpers shared with
:mod:`intervene.sites.chain`.

Everything here reads one block's float32 re-run (:func:`intervene.sites.block.rerun`). Submodules
whose outputs are the same values form a :class:`Group`; a *writer* is a group whose output the block
adds to the residual. :func:`two_writers` is the common case, checked first: two groups (attention
first) whose outputs add up to ``output - input`` — exactly, or each times a constant (Granite's
``residual_multiplier``; the gain is recorded) — or, in a post-LN block, whose outputs are added
before each of its two norms. Blocks it cannot explain go to :func:`intervene.sites.chain.chain_writers`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from intervene.sites import probe

# A gain with which a writer's output (or the residual itself) enters the residual: one constant, or
# one per hidden channel (Doge's and Ergo's learned residual gates).
Gain = float | tuple[float, ...]


def gain_tensor(g: Gain, h: int) -> torch.Tensor:
    """A gain as a float64 ``[h]`` vector."""
    return torch.full((h,), g, dtype=torch.float64) if isinstance(g, float) else torch.tensor(g, dtype=torch.float64)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, GPT-2's ``Conv1D``, or anything with a 2-D weight and an ``in_features``."""
    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        return False
    return type(module).__name__ == "Conv1D" or isinstance(getattr(module, "in_features", None), int)


def in_features(module: nn.Module) -> int | None:
    """Width of a Linear-like module's input (GPT-2's ``Conv1D`` stores its weight as ``[in, out]``)."""
    n = getattr(module, "in_features", None)
    if isinstance(n, int):
        return int(n)
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 2 and type(module).__name__ == "Conv1D":
        return int(w.shape[0])
    return None


@dataclass(eq=False)  # compared by identity: two groups never hold equal values
class Group:
    """Submodules of one block whose outputs are the same tensor values."""

    value: torch.Tensor
    members: list[str]
    order: int


def groups(rec: probe.Record, i: int, block: nn.Module) -> list[Group]:
    """Block ``i``'s residual-shaped submodule outputs, grouped by value, in the order they finished."""
    out: list[Group] = []
    rels = [r for r, _ in block.named_modules() if r and f"{i}/{r}" in rec.out]
    for rel in sorted(rels, key=lambda r: rec.order[f"{i}/{r}"]):
        v = rec.out[f"{i}/{rel}"]
        g = next((g for g in out if torch.equal(g.value, v)), None)
        if g is None:
            out.append(Group(v, [rel], rec.order[f"{i}/{rel}"]))
        else:
            g.members.append(rel)
    return out


def pick(g: Group, block: nn.Module) -> str:
    """The name for a group: its last Linear-like member, else its outermost (an MoE block, say)."""
    lin = [r for r in g.members if is_linear(block.get_submodule(r))]
    return lin[-1] if lin else min(g.members, key=lambda r: r.count("."))


def top(rel: str, block: nn.Module) -> str:
    """The block's branch ``rel`` lies in: its first path component, with the index kept when that
    component is a ``ModuleList`` / ``ModuleDict`` (LongCat-Flash keeps two attentions in one list)."""
    parts = rel.split(".")
    head = block.get_submodule(parts[0])
    return ".".join(parts[:2]) if isinstance(head, (nn.ModuleList, nn.ModuleDict)) and len(parts) > 1 else parts[0]


def _fit(target: torch.Tensor, a: torch.Tensor, m: torch.Tensor, tol: float) -> tuple[float, float] | None:
    """Constants ``(α, β)`` with ``target = α a + β m`` to within ``tol``, else ``None`` (1.0 when exact)."""
    if float((target - a - m).abs().max()) <= tol:
        return 1.0, 1.0
    basis = torch.stack([a.reshape(-1), m.reshape(-1)], 1)
    coef = torch.linalg.lstsq(basis, target.reshape(-1, 1)).solution[:, 0]
    if float((basis @ coef - target.reshape(-1)).abs().max()) > tol or bool((coef.abs() < 1e-3).any()):
        return None
    return float(coef[0]), float(coef[1])


Fit = tuple[Group, Group, tuple[float, float]]


def two_writers(rec: probe.Record, i: int, block: nn.Module, x: torch.Tensor, y: torch.Tensor,
                found_groups: list[Group], tol: float) -> tuple[list[Fit], bool]:
    """Pairs ``(attn, mlp, gains)`` explaining block ``i``: ``y - x = α attn + β mlp`` with constants,
    else post-LN pairs; and whether they are post-LN. Several pairs mean the answer is ambiguous."""
    live = [g for g in found_groups if float(g.value.abs().max()) > 100 * tol]  # a writer must be visible
    # the two writers live in different children of the block: two halves of one MoE are not attn + MLP
    pairs = [(a, m) for a, m in itertools.combinations(live, 2)
             if pick(a, block).split(".")[0] != pick(m, block).split(".")[0]]
    fits = [(a, m, gains) for a, m in pairs if (gains := _fit(y - x, a.value, m.value, tol)) is not None]
    if fits:
        return fits, False
    return _post_ln(rec, i, block, x, y, found_groups, tol), True


def _post_ln(rec: probe.Record, i: int, block: nn.Module, x: torch.Tensor, y: torch.Tensor, found_groups: list[Group],
             tol: float) -> list[Fit]:
    """Post-LN writer pairs: a norm ``N2`` outputs ``y`` and reads ``N1(x + a) + m``; ``N1`` reads ``x + a``."""
    fits = []
    for n2, n2_in in ((r, rec.inp.get(f"{i}/{r}")) for r, _ in block.named_modules() if r):
        if n2_in is None or n2_in.shape != y.shape or not torch.equal(rec.out.get(f"{i}/{n2}", x[:0]), y):
            continue
        for g1 in found_groups:
            m = next((g for g in found_groups
                      if g is not g1 and float((n2_in - g1.value - g.value).abs().max()) <= tol), None)
            n1_in = [rec.inp[k] for r in g1.members if (k := f"{i}/{r}") in rec.inp and rec.inp[k].shape == x.shape]
            a = next((g for g in found_groups for u in n1_in if float((u - x - g.value).abs().max()) <= tol), None)
            if m is not None and a is not None and a.order < m.order:
                fits.append((a, m, (1.0, 1.0)))
    return fits[:1] if fits and all(f[:2] == fits[0][:2] for f in fits) else fits


def projection(rec: probe.Record, i: int, block: nn.Module, found_groups: list[Group], writer: str) -> tuple[str | None, str]:
    """``(the Linear-like module producing what ``writer`` adds, "")``: the writer itself, or for a
    post-norm (or short conv) the Linear whose output it reads; else ``(None, why)``."""
    mod = block.get_submodule(writer)
    if is_linear(mod):
        return writer, ""
    win = rec.inp.get(f"{i}/{writer}")
    src = next((g for g in found_groups if win is not None and torch.equal(g.value, win)), None)
    lin = [r for r in (src.members if src else []) if is_linear(block.get_submodule(r))]
    if lin:
        return lin[-1], ""
    return None, f"{writer} ({type(mod).__name__}) is not a Linear layer and reads no Linear layer's output"


def branch_members(rec: probe.Record, i: int, block: nn.Module, found_groups: list[Group], g: Group) -> list[str]:
    """A writer's modules: its group's, and for a writer that is not Linear-like (a post-norm) those of
    the group whose output it reads (``self_attn`` and its ``o_proj`` for a post-attention norm)."""
    name = pick(g, block)
    if is_linear(block.get_submodule(name)):
        return list(g.members)
    win = rec.inp.get(f"{i}/{name}")
    src = next((s for s in found_groups if win is not None and torch.equal(s.value, win)), None)
    return list(g.members) + (src.members if src is not None else [])


def computes_attention(rec: probe.Record, i: int, block: nn.Module, members: list[str]) -> bool:
    """Whether a softmax over key positions ran, during the re-run, inside the branch of the block holding
    one of ``members`` (BERT's ``attention.output.dense`` writes what ``attention.self`` computed)."""
    return any(f"{i}/{top(m, block)}" in rec.attention for m in members)


def found_pair(rec: probe.Record, i: int, block: nn.Module, found_groups: list[Group], fit: Fit,
               post_norm: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``found`` / ``missing`` entries (see :func:`intervene.sites.discovery._writers`) for one pair."""
    a, m, gains = fit
    found: dict[str, Any] = {"attn": pick(a, block), "mlp": pick(m, block), "gains": gains, "post_norm": post_norm,
                             "attention": computes_attention(rec, i, block,
                                                             branch_members(rec, i, block, found_groups, a))}
    missing: dict[str, str] = {}
    for part in ("attn", "mlp"):
        proj, why = projection(rec, i, block, found_groups, found[part])
        if proj is None:
            missing[f"{part}_proj"] = why
        else:
            found[f"{part}_proj"] = proj
    return found, missing
