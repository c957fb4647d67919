"""Activation-patching sweeps: the effect of patching each (site, position) cell, many cells per forward.

>>> res = sweep(model, clean, corrupted, logit_diff(answer, wrong), sites="layers.*", tokenizer=tok)
>>> res.scores        # [sites, positions]: 0 = corrupted, 1 = clean (denoising)
>>> res.plot("patching.png")

Denoising (the default, as TransformerLens and ROME): run the corrupted prompt with one cell's clean
activation patched in. Noising: run the clean prompt with the corrupted activation. Each row of a
batch patches exactly one cell of one pair, so many cells share a forward; rows never interact (an
eval-mode model; no batch statistics), which makes a sweep equal to the loop of one forward per cell
it replaces (to float rounding, ~1e-6, since a different batch size may pick different kernels).

Positions: ``"each"`` (every token; every prompt must have the same length), ``"all"`` (one column:
patch every position at once), or a list of own-token indices (negative ones count from each row's
end, so prompts of different lengths align at their ends). ``layers.{i}.heads`` sites sweep each
head separately (``heads="each"``) or the whole site.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from intervene.errors import InterventionError, PositionsError
from intervene.intervenable import Intervenable
from intervene.methods.patching.exchange import attached_with
from intervene.methods.patching.intervention import Patch
from intervene.methods.patching.metrics import Metric, PatchingResult
from intervene.methods.patching.record import (
    Inputs,
    model_of,
    own_positions,
    record,
    row_lengths,
    with_position_ids,
)
from intervene.sites import Site, expand_sites, resolve_site

PositionsArg = str | Sequence[int]


@dataclass(frozen=True)
class Cell:
    """One row of the grid: a site, and for a heads site maybe one head."""

    label: str
    site: str
    head: int | None = None


def encode(tokenizer: Any, texts: Sequence[str] | Inputs) -> dict[str, torch.Tensor]:
    """Tokenizer inputs for ``texts`` (left padded), or ``texts`` itself when it already is inputs."""
    if isinstance(texts, Mapping):
        return dict(texts)
    if tokenizer is None:
        raise InterventionError("pass tokenizer=... to patch strings (or give tokenized inputs)")
    side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def last_logits(logits: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """``[batch, vocab]`` logits at each row's last real token (left or right padding; ``logits`` may hold only
    the last position, computed with ``logits_to_keep=1`` when every row ends on a real token)."""
    mask = inputs.get("attention_mask")
    if mask is None or logits.shape[1] == 1:
        return logits[:, -1]
    cols = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.bool() * cols).argmax(-1)
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


def cells_of(model: nn.Module, sites: str | Sequence[str], heads: str) -> tuple[list[Cell], dict[str, Site]]:
    resolved = {n: resolve_site(model, n) for n in expand_sites(model, sites)}
    cells = []
    for name, site in resolved.items():
        if site.heads is not None and heads == "each":
            cells += [Cell(f"{name}[{h}]", name, h) for h in range(site.heads[0])]
        else:
            cells.append(Cell(name, name))
    return cells, resolved


def position_grid(positions: PositionsArg, base: Inputs, source: Inputs) -> tuple[list[int | str], list[list[list[int]]],
                                                                                    list[list[list[int]]]]:
    """Column labels and, per column and pair, the base and source own positions it patches."""
    lb, ls = row_lengths(base), row_lengths(source)
    n = int(lb.shape[0])
    if positions == "each":
        if int(lb.min()) != int(lb.max()) or not torch.equal(lb, ls):
            raise PositionsError("positions='each' needs every clean and corrupted prompt to have the same number of "
                                 f"tokens (lengths {sorted(set(lb.tolist() + ls.tolist()))}); pass a list of "
                                 "positions counted from the end instead, e.g. [-3, -2, -1]")
        length = int(lb[0])
        return list(range(length)), [[[j]] * n for j in range(length)], [[[j]] * n for j in range(length)]
    if positions == "all":
        b = [list(range(int(x))) for x in lb.tolist()]
        s = [list(range(int(x))) for x in ls.tolist()]
        if any(len(x) != len(y) for x, y in zip(b, s)):
            raise PositionsError("positions='all' maps every token of a pair: clean and corrupted must have the same "
                                 "length in each pair")
        return ["all"], [b], [s]
    if isinstance(positions, str):
        raise PositionsError(f"unknown positions {positions!r}: 'each', 'all' or a list of indices")
    cols = [int(p) for p in positions]
    bo, so = own_positions(cols, lb), own_positions(cols, ls)
    return list(cols), [[[r[j]] for r in bo] for j in range(len(cols))], [[[r[j]] for r in so] for j in range(len(cols))]


def _record_all(target: nn.Module | Intervenable, inputs: Inputs, sites: list[str], batch_size: int
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Activations ``{site: [N, T, *site]}`` and the last-token logits ``[N, vocab]`` of one unpatched pass."""
    n = int(inputs["input_ids"].shape[0])
    parts: list[dict[str, torch.Tensor]] = []
    logits = []
    for s in range(0, n, batch_size):
        chunk = {k: v[s:s + batch_size] for k, v in inputs.items()}
        acts, out = record(target, chunk, sites, use_cache=False)
        parts.append(acts)
        logits.append(last_logits(out.logits, chunk).float())
    return {k: torch.cat([p[k] for p in parts]) for k in sites}, torch.cat(logits)


def sweep(model: nn.Module | Intervenable, clean: Sequence[str] | Inputs, corrupted: Sequence[str] | Inputs,
          metric: Metric, sites: str | Sequence[str] = "layers.*", positions: PositionsArg = "each", *,
          tokenizer: Any = None, direction: str = "denoise", heads: str = "each", batch_size: int = 64,
          progress: bool = True) -> PatchingResult:
    """Patch every (site, position) cell and measure ``metric`` (see the module docstring).

    Args:
        model: a causal LM, or an ``Intervenable`` whose edits apply to every run.
        clean, corrupted: ``N`` prompts each (strings with ``tokenizer``, or tokenized inputs), pairwise.
        metric: ``metric(last_logits [rows, vocab], pair [rows]) -> [rows]`` (see ``metrics.logit_diff``).
        sites: names or wildcards; ``layers.*``, ``layers.*.attn``, ``layers.*.mlp``, ``layers.*.heads``.
        direction: ``"denoise"`` (clean into corrupted) or ``"noise"`` (corrupted into clean).
        heads: ``"each"`` sweeps heads of ``.heads`` sites one by one; ``"site"`` patches all heads together.
        batch_size: rows (cell x pair) per forward.

    Returns a :class:`PatchingResult` ``[rows, positions]``.
    """
    if direction not in ("denoise", "noise"):
        raise InterventionError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    if heads not in ("each", "site"):
        raise InterventionError(f"heads must be 'each' or 'site', got {heads!r}")
    m = model_of(model)
    clean_in, corr_in = encode(tokenizer, clean), encode(tokenizer, corrupted)
    n = int(clean_in["input_ids"].shape[0])
    if int(corr_in["input_ids"].shape[0]) != n or n == 0:
        raise InterventionError(f"{n} clean and {int(corr_in['input_ids'].shape[0])} corrupted prompts: give pairs")
    base_in, src_in = (corr_in, clean_in) if direction == "denoise" else (clean_in, corr_in)
    base_in, src_in = with_position_ids(m, base_in), with_position_ids(m, src_in)
    cells, resolved = cells_of(m, sites, heads)
    names = list(resolved)
    labels, base_pos, src_pos = position_grid(positions, base_in, src_in)
    with torch.no_grad():
        src_acts, src_metric_logits = _record_all(model, src_in, names, batch_size)
        need_base = any(c.head is not None for c in cells)
        base_acts, base_logits = _record_all(model, base_in, names if need_base else [], batch_size)
    pair = torch.arange(n)
    m_src, m_base = metric(src_metric_logits, pair).float(), metric(base_logits, pair).float()
    m_clean, m_corr = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
    src_cols = [src_in["attention_mask"][i].nonzero().flatten() for i in range(n)]
    base_cols = [base_in["attention_mask"][i].nonzero().flatten() for i in range(n)]

    prefix = _shared_prefix(m, base_in, base_pos)  # per column: the position every row patches, if shared
    jobs = [(c, j, p) for j in range(len(labels)) for c in range(len(cells)) for p in range(n)]
    per_pair = torch.empty(len(cells), len(labels), n)
    bar = tqdm(total=len(jobs), desc="patching", unit="cell", disable=not progress)
    caches: dict[int, Any] = {}
    keep_last = ends_real(m, base_in)
    per_column = len(cells) * n
    starts = (range(0, len(jobs), batch_size) if prefix is None else  # with a shared prefix, never mix columns
              [j * per_column + s for j in range(len(labels)) for s in range(0, per_column, batch_size)])
    for start in starts:
        chunk = jobs[start:min(start + batch_size, len(jobs) if prefix is None else (start // per_column + 1) * per_column)]
        # rows patching the same column share its prefix: run only the suffix from the corrupted KV cache
        cut = prefix[chunk[0][1]] if prefix is not None and len({j for _, j, _ in chunk}) == 1 else 0
        rows = torch.tensor([p for _, _, p in chunk])
        patches = []
        for name in {cells[c].site for c, _, _ in chunk}:
            site = resolved[name]
            assert site.shape is not None
            k = max(len(base_pos[j][p]) for c, j, p in chunk if cells[c].site == name)
            values = torch.zeros(len(chunk), k, *site.shape, dtype=src_acts[name].dtype)
            own: list[list[int]] = []
            for r, (c, j, p) in enumerate(chunk):
                if cells[c].site != name:
                    own.append([])
                    continue
                bp, sp = base_pos[j][p], src_pos[j][p]
                vals = src_acts[name][p, src_cols[p][sp]]
                if cells[c].head is not None:  # the base's own activation with one head replaced
                    whole = base_acts[name][p, base_cols[p][bp]].clone()
                    whole[:, cells[c].head] = vals[:, cells[c].head]
                    vals = whole
                values[r, : len(bp)] = vals
                own.append(list(bp))
            patches.append(Patch({name: values}, positions={"per_example": own}, per_example=True,
                                 name=f"cell_{len(patches)}"))
        inputs = {k: v[rows] for k, v in base_in.items()}
        if cut:
            if cut not in caches:
                caches = {cut: _prefix_cache(model, base_in, cut)}  # columns run in order: keep one
            inputs = _suffix_inputs(m, inputs, caches[cut], rows, cut)
        if keep_last:  # every row ends on a real token: only the last position's logits are read
            inputs["logits_to_keep"] = 1
        with torch.no_grad(), attached_with(model, patches) as ivm:
            out = ivm(**inputs, use_cache=bool(cut))
        vals = metric(out.logits[:, -1].float() if cut else last_logits(out.logits, inputs).float(), rows).float()
        for r, (c, j, p) in enumerate(chunk):
            per_pair[c, j, p] = vals[r]
        bar.update(len(chunk))
    bar.close()
    raw = per_pair.mean(-1)
    clean_mean, corr_mean = float(m_clean.mean()), float(m_corr.mean())
    denom = clean_mean - corr_mean
    if abs(denom) < 1e-12:
        raise InterventionError("the metric is the same on clean and corrupted prompts: nothing to recover")
    tokens = _tokens(tokenizer, base_in, labels)
    return PatchingResult((raw - corr_mean) / denom, raw, per_pair, clean_mean, corr_mean, [c.label for c in cells],
                          labels, tokens, direction, meta={"n_pairs": n, "batch_size": batch_size})


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def ends_real(model: nn.Module, inputs: Inputs) -> bool:
    """Whether every row's last column is a real token (no right padding) and the model can skip the other
    positions' logits (``logits_to_keep``): then only the last position's logits are computed."""
    mask = inputs.get("attention_mask")
    return _accepts(model, "logits_to_keep") and (mask is None or bool(mask[:, -1].bool().all()))


def _cache_argument(model: nn.Module) -> str | None:
    """The name under which the model's forward takes a KV cache (transformers 5: ``cache``)."""
    return next((n for n in ("cache", "past_key_values") if _accepts(model, n)), None)


def _shared_prefix(model: nn.Module, base: Inputs, base_pos: list[list[list[int]]]) -> list[int] | None:
    """Per column, the single own position every pair patches — when no row is padded and the model takes a
    KV cache — else ``None``. Tokens before it are the unpatched base run's in every row (causal attention),
    so they are computed once and the patched rows run from there."""
    mask = base.get("attention_mask")
    if _cache_argument(model) is None or (mask is not None and not bool(mask.bool().all())):
        return None
    out = []
    for col in base_pos:
        firsts = {tuple(rows) for rows in col}
        if len(firsts) != 1 or len(next(iter(firsts))) != 1:
            return None
        out.append(next(iter(firsts))[0])
    return out


def _prefix_cache(target: nn.Module | Intervenable, base: Inputs, cut: int) -> Any:
    """The KV cache of every pair's first ``cut`` base tokens (the target's own edits applied)."""
    prefix = {k: v[:, :cut] for k, v in base.items()}
    with torch.no_grad():
        return target(**prefix, use_cache=True).past_key_values


def _suffix_inputs(model: nn.Module, inputs: Inputs, cache: Any, rows: torch.Tensor, cut: int) -> dict[str, Any]:
    """The rows' tokens from ``cut`` on, with a copy of the prefix cache reordered to the rows' pairs."""
    mine = copy.deepcopy(cache)
    mine.reorder_cache(rows)
    out: dict[str, Any] = {k: v[:, cut:] for k, v in inputs.items() if k != "attention_mask"}
    out["attention_mask"] = inputs["attention_mask"]  # the whole row: past and new tokens
    out[_cache_argument(model) or "past_key_values"] = mine
    return out


def _tokens(tokenizer: Any, inputs: Inputs, labels: list[int | str]) -> list[str] | None:
    """Token strings of the first prompt at integer columns (for plot labels)."""
    if tokenizer is None or any(not isinstance(p, int) for p in labels):
        return None
    cols = inputs["attention_mask"][0].nonzero().flatten()
    ids = inputs["input_ids"][0, cols].tolist()
    out = []
    for p in labels:
        assert isinstance(p, int)
        q = p + len(ids) if p < 0 else p
        out.append(tokenizer.decode([ids[q]]) if 0 <= q < len(ids) else "?")
    return out
