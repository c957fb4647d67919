"""Attribution patching (Nanda 2023; Syed, Rager & Conmy 2023): a first-order estimate of every patching cell.

For denoising, the effect of patching cell ``c`` (a site at a position) is estimated by linearising the
metric at the corrupted run::

    M(corrupted with clean a_c) − M(corrupted) ≈ (a_c^clean − a_c^corrupted) · ∂M/∂a_c |corrupted

summed over the activation's features (per head for ``.heads`` sites). Every cell of every site
comes from one clean forward, one corrupted forward and one backward (noising: linearised at the
clean run, with the roles swapped). The gradient is taken with respect to a zero tensor added to
each site's activation — the exact tensor downstream modules consume — with ``torch.autograd.grad``,
so no gradient is ever stored on the model's parameters. The result has the same rows, columns and
normalisation as :func:`~intervene.methods.patching.sweeps.sweep`, so the two can be compared cell by
cell; it is an estimate, worst for large sites (the residual stream) and saturated attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from intervene.errors import InterventionError
from intervene.hooks import HookSet, add_input_hook, add_output_hook
from intervene.intervenable import Intervenable
from intervene.methods.patching.metrics import Metric, PatchingResult
from intervene.methods.patching.record import Inputs, model_of, record, site_view, with_position_ids
from intervene.methods.patching.sweeps import (
    PositionsArg,
    _tokens,
    cells_of,
    encode,
    ends_real,
    last_logits,
    position_grid,
)
from intervene.sites import Site


def _forward_with_grads(target: nn.Module | Intervenable, inputs: Inputs, sites: dict[str, Site], metric: Metric,
                        pair: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """One forward with a zero ``δ`` added at every site, then ``∂ Σ_rows M / ∂δ``.

    Returns ``(activations, gradients, metric)``: ``{site: [batch, seq, *site]}`` twice and ``[batch]``.
    """
    ids = inputs["input_ids"]
    batch, seq = int(ids.shape[0]), int(ids.shape[1])
    acts: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    hooks = HookSet()

    def adder(site: Site):
        def add(h: torch.Tensor) -> torch.Tensor:
            if site.name in deltas:
                raise InterventionError(f"{site.name} ran twice in one forward; attribution needs one call per site")
            acts[site.name] = site_view(h.detach(), site, batch, seq).float()
            delta = torch.zeros_like(h, requires_grad=True)
            deltas[site.name] = delta
            return h + delta

        return add

    try:
        for site in sites.values():
            (add_input_hook if site.side == "input" else add_output_hook)(hooks, site.module, adder(site), site.name)
        with torch.enable_grad():
            out = target(**inputs, use_cache=False, **({"logits_to_keep": 1} if ends_real(model_of(target), inputs)
                                                     else {}))
            values = metric(last_logits(out.logits, inputs).float(), pair).float()
            names = list(deltas)
            grads = torch.autograd.grad(values.sum(), [deltas[n] for n in names], allow_unused=True)
    finally:
        hooks.remove()
    g = {}
    for n, d, gr in zip(names, (deltas[n] for n in names), grads):
        g[n] = site_view((torch.zeros_like(d) if gr is None else gr).detach(), sites[n], batch, seq).float()
    return acts, g, values.detach()


def _column_index(base: Inputs, src: Inputs, base_pos: list[list[list[int]]], src_pos: list[list[list[int]]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded-batch columns ``[N, J, K]`` of each column's base and source positions, and which are real
    (``K`` > 1 only for positions="all", where a column covers a whole row)."""
    n, j = len(base_pos[0]), len(base_pos)
    k = max(len(base_pos[c][p]) for c in range(j) for p in range(n))
    bcol = torch.zeros(n, j, k, dtype=torch.long)
    scol = torch.zeros(n, j, k, dtype=torch.long)
    valid = torch.zeros(n, j, k)
    for p in range(n):
        breal = base["attention_mask"][p].nonzero().flatten()
        sreal = src["attention_mask"][p].nonzero().flatten()
        for c in range(j):
            b, s = base_pos[c][p], src_pos[c][p]
            bcol[p, c, : len(b)], scol[p, c, : len(s)] = breal[b], sreal[s]
            valid[p, c, : len(b)] = 1.0
    return bcol, scol, valid


def attribution_patching(model: nn.Module | Intervenable, clean: Sequence[str] | Inputs,
                         corrupted: Sequence[str] | Inputs, metric: Metric, sites: str | Sequence[str] = "layers.*",
                         positions: PositionsArg = "each", *, tokenizer: Any = None, direction: str = "denoise",
                         heads: str = "each", batch_size: int = 32, progress: bool = True) -> PatchingResult:
    """Estimate every cell of :func:`~intervene.methods.patching.sweeps.sweep` from 2 forwards + 1 backward.

    Arguments as for ``sweep``. ``result.raw`` holds the estimated patched metric ``M_base + Î`` and
    ``result.scores`` its normalisation, so ``scores`` compare directly with a real sweep's.
    """
    if direction not in ("denoise", "noise"):
        raise InterventionError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    m = model_of(model)
    clean_in, corr_in = encode(tokenizer, clean), encode(tokenizer, corrupted)
    n = int(clean_in["input_ids"].shape[0])
    if int(corr_in["input_ids"].shape[0]) != n or n == 0:
        raise InterventionError("give as many clean as corrupted prompts")
    base_in, src_in = (corr_in, clean_in) if direction == "denoise" else (clean_in, corr_in)
    base_in, src_in = with_position_ids(m, base_in), with_position_ids(m, src_in)
    cells, resolved = cells_of(m, sites, heads)
    labels, base_pos, src_pos = position_grid(positions, base_in, src_in)
    per_pair = torch.empty(len(cells), len(labels), n)
    m_base, m_src = torch.empty(n), torch.empty(n)
    bcol, scol, valid = _column_index(base_in, src_in, base_pos, src_pos)
    cell_ids: dict[str, list[int]] = {}
    for c, cell in enumerate(cells):
        cell_ids.setdefault(cell.site, []).append(c)
    bar = tqdm(total=n, desc="attribution", unit="pair", disable=not progress)
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(n, start + batch_size))
        b_in = {k: v[rows] for k, v in base_in.items()}
        s_in = {k: v[rows] for k, v in src_in.items()}
        with torch.no_grad():
            src_acts, src_out = record(model, s_in, list(resolved), use_cache=False,
                                       **({"logits_to_keep": 1} if ends_real(m, s_in) else {}))
        m_src[rows] = metric(last_logits(src_out.logits, s_in).float(), rows).float()
        base_acts, grads, m_base[rows] = _forward_with_grads(model, b_in, resolved, metric, rows)
        r_idx = torch.arange(len(rows))[:, None, None]
        bc, sc, ok = bcol[rows], scol[rows], valid[rows]  # [R, J, K]
        for name in resolved:
            diff = src_acts[name].float()[r_idx, sc] - base_acts[name][r_idx, bc]  # [R, J, K, *site]
            prod = (diff * grads[name][r_idx, bc]).sum(-1)  # [R, J, K] or, per head, [R, J, K, H]
            prod = (prod * ok.view(*ok.shape, *([1] * (prod.ndim - 3)))).sum(2)  # [R, J] or [R, J, H]
            for c in cell_ids[name]:
                head = cells[c].head
                per_pair[c, :, rows] = (prod if head is None else prod[..., head]).T
        bar.update(len(rows))
    bar.close()
    m_clean, m_corr = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
    clean_mean, corr_mean = float(m_clean.mean()), float(m_corr.mean())
    denom = clean_mean - corr_mean
    if abs(denom) < 1e-12:
        raise InterventionError("the metric is the same on clean and corrupted prompts: nothing to attribute")
    raw = (m_base[None, None, :] + per_pair).mean(-1)
    return PatchingResult((raw - corr_mean) / denom, raw, m_base[None, None, :] + per_pair, clean_mean, corr_mean,
                          [c.label for c in cells], labels, _tokens(tokenizer, base_in, labels), direction,
                          method="attribution patching", meta={"n_pairs": n})
