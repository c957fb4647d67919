"""Examples of a latent for explaining and scoring: activating windows by quantile, and non-activating ones.

Every window returned for a latent — explanation examples, scoring examples, random and "hard"
non-activating examples — is disjoint from every other one: no token of the corpus appears in two
of them. A scorer therefore never sees a text the explainer was shown (delphi samples explanation
and test windows independently, so they can overlap).

* Activating windows are placed around activations (``window`` tokens, most of them *before* the
  activation, since a causal model's latent depends on what precedes it), greedily from the
  strongest activation down, skipping windows that would overlap one already taken.
* Explanation examples are the strongest windows (``explain_from="top"``), or stratified over
  activation quantiles; scoring examples are stratified over ``n_quantiles`` quantiles of the rest.
* Non-activating windows contain no activation of the latent: random ones, and hard ones from
  similar contexts (``hard="token"``: windows around other occurrences of the tokens the latent
  fires on most; ``hard="similar"``: the windows most similar to the activating ones, by
  bag-of-tokens cosine or, given ``embeddings``, mean token-embedding cosine).
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from intervene.features.store import LatentCache


@dataclass
class Example:
    """A window of the corpus: ``tokens`` (ids) at ``row``, columns ``start:start+len(tokens)``, with the
    latent's activation on each token (``acts``; 0 where silent)."""

    row: int
    start: int
    tokens: list[int]
    acts: list[float]
    kind: str  # "activating" | "random" | "hard"
    quantile: int | None = None  # 1 (weakest) .. n_quantiles (strongest), activating windows only
    max_act: float = field(init=False)

    def __post_init__(self) -> None:
        self.max_act = max(self.acts) if self.acts else 0.0

    @property
    def span(self) -> tuple[int, int, int]:
        """``(row, start, end)`` in the cache's token array."""
        return self.row, self.start, self.start + len(self.tokens)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["acts"] = [round(float(a), 6) for a in self.acts]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Example:
        return cls(d["row"], d["start"], list(d["tokens"]), list(d["acts"]), d["kind"], d.get("quantile"))


@dataclass
class LatentExamples:
    """A latent's examples: ``explain`` (for the explainer), ``score_activating`` / ``score_nonactivating``
    (for scorers) — pairwise disjoint windows."""

    latent: int
    explain: list[Example]
    score_activating: list[Example]
    score_nonactivating: list[Example]

    def all(self) -> list[Example]:
        return self.explain + self.score_activating + self.score_nonactivating

    def to_json(self) -> dict[str, Any]:
        return {"latent": self.latent, **{k: [e.to_json() for e in getattr(self, k)]
                                          for k in ("explain", "score_activating", "score_nonactivating")}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatentExamples:
        return cls(int(d["latent"]), *[[Example.from_json(e) for e in d[k]]
                                       for k in ("explain", "score_activating", "score_nonactivating")])


class _Occupied:
    """Token intervals already used, per row; all windows have one length ``w``."""

    def __init__(self, w: int) -> None:
        self.w = w
        self.starts: dict[int, list[int]] = {}

    def free(self, row: int, start: int) -> bool:
        s = self.starts.get(row, [])
        i = bisect.bisect_left(s, start)
        return (i == len(s) or s[i] - start >= self.w) and (i == 0 or start - s[i - 1] >= self.w)

    def take(self, row: int, start: int) -> None:
        bisect.insort(self.starts.setdefault(row, []), start)


def _stratify(items: list[Example], n: int, n_quantiles: int, rng: random.Random) -> list[Example]:
    """``n`` items spread evenly over the quantile bins (``items[i].quantile`` set), fewest-first fill."""
    bins: dict[int, list[Example]] = {}
    for e in items:
        bins.setdefault(e.quantile or 0, []).append(e)
    for b in bins.values():
        rng.shuffle(b)
    out: list[Example] = []
    order = sorted(bins, reverse=True)
    while len(out) < n and any(bins.values()):
        for q in order:
            if bins[q] and len(out) < n:
                out.append(bins[q].pop())
    return out


def sample_examples(cache: LatentCache, latent: int, *, window: int = 16, n_explain: int = 20, n_score: int = 20,
                    n_nonactivating: int = 20, n_quantiles: int = 5,
                    explain_from: Literal["top", "quantiles", "random"] = "top",
                    hard: Literal["token", "similar"] | None = "token", hard_fraction: float = 0.5,
                    embeddings: torch.Tensor | None = None, max_candidates: int = 4096,
                    seed: int = 0) -> LatentExamples:
    """Pick explanation and scoring examples for ``latent`` (see the module docstring).

    Args:
        window: tokens per example (at most the cache's ``ctx_len``).
        n_explain / n_score: activating windows for the explainer / for scorers (disjoint).
        n_nonactivating: non-activating windows for scorers; ``hard_fraction`` of them hard
            (when ``hard`` is set), the rest random.
        embeddings: ``[vocab, d]`` token embeddings for ``hard="similar"`` (else bag-of-tokens).
        max_candidates: activations considered for windows (the strongest half, a random half of the rest).
    """
    rng = random.Random(f"{seed}-{latent}")
    tokens = cache.tokens
    n_rows, L = tokens.shape
    w = min(window, L)
    before = (w * 3) // 4
    rec = cache.latent(latent)
    pos, val = rec.positions, rec.values.float()
    occ = _Occupied(w)

    def acts_of(row: int, start: int) -> list[float]:
        lo = row * L + start
        a, b = torch.searchsorted(pos, torch.tensor([lo, lo + w])).tolist()
        out = [0.0] * w
        for p, v in zip(pos[a:b].tolist(), val[a:b].tolist()):
            out[p - lo] = v
        return out

    def silent(row: int, start: int) -> bool:
        lo = row * L + start
        a = int(torch.searchsorted(pos, torch.tensor(lo)))
        return a == pos.numel() or int(pos[a]) >= lo + w

    def make(row: int, start: int, kind: str) -> Example:
        return Example(row, start, tokens[row, start:start + w].tolist(), acts_of(row, start), kind)

    # ---- activating windows ----------------------------------------------------------------
    order = torch.argsort(val, descending=True, stable=True).tolist()
    if len(order) > max_candidates:
        half = max_candidates // 2
        order = order[:half] + sorted(rng.sample(order[half:], max_candidates - half),
                                      key=lambda i: -float(val[i]))
    taken = _Occupied(w)
    windows: list[Example] = []
    for i in order:
        row, col = divmod(int(pos[i]), L)
        start = min(max(0, col - before), L - w)
        if taken.free(row, start):
            taken.take(row, start)
            windows.append(make(row, start, "activating"))
    windows.sort(key=lambda e: -e.max_act)
    for r, e in enumerate(windows):  # rank-based bins: n_quantiles (strongest) .. 1
        e.quantile = n_quantiles - (r * n_quantiles) // max(1, len(windows))
    if explain_from == "top":
        explain = windows[:n_explain]
    elif explain_from == "quantiles":
        explain = _stratify(windows, n_explain, n_quantiles, rng)
    else:
        explain = rng.sample(windows, min(n_explain, len(windows)))
    chosen = {id(e) for e in explain}
    score_act = _stratify([e for e in windows if id(e) not in chosen], n_score, n_quantiles, rng)
    for e in explain + score_act:
        occ.take(e.row, e.start)

    # ---- non-activating windows --------------------------------------------------------------
    n_hard = round(n_nonactivating * hard_fraction) if hard and windows else 0
    nonact: list[Example] = []

    def accept(row: int, start: int, kind: str) -> bool:
        if occ.free(row, start) and silent(row, start):
            occ.take(row, start)
            nonact.append(make(row, start, kind))
            return True
        return False

    if n_hard:
        for row, start in _hard_candidates(cache, windows[:max(n_explain, 10)], w, before, hard, embeddings,
                                           silent, rng):
            if len(nonact) >= n_hard:
                break
            accept(row, start, "hard")
    tries = 0
    while len(nonact) < n_nonactivating and tries < 50 * max(1, n_nonactivating):
        tries += 1
        accept(rng.randrange(n_rows), rng.randrange(L - w + 1), "random")
    return LatentExamples(int(latent), explain, score_act, nonact)


def _hard_candidates(cache: LatentCache, top: list[Example], w: int, before: int, how: str,
                     embeddings: torch.Tensor | None, silent: Any, rng: random.Random) -> list[tuple[int, int]]:
    """Windows that look like the activating ones but where the latent is silent, best first."""
    tokens = cache.tokens
    n_rows, L = tokens.shape
    if not top:
        return []
    peak = Counter(e.tokens[max(range(len(e.acts)), key=e.acts.__getitem__)] for e in top)
    if how == "token":
        out: list[tuple[int, int]] = []
        for tok, _ in peak.most_common(5):
            rows, cols = (tokens == tok).nonzero(as_tuple=True)
            cand = [(int(r), min(max(0, int(c) - before), L - w)) for r, c in zip(rows, cols)]
            rng.shuffle(cand)
            out += [c for c in cand[:2000] if silent(*c)]
        return out
    if how != "similar":
        raise ValueError(f"hard must be 'token', 'similar' or None, got {how!r}")
    pool = {(rng.randrange(n_rows), rng.randrange(L - w + 1)) for _ in range(2000)}
    pool = [c for c in pool if silent(*c)]
    if not pool:
        return []
    ids = torch.stack([tokens[r, s:s + w].long() for r, s in pool])  # [P, w]
    act_ids = torch.tensor([e.tokens for e in top], dtype=torch.long)  # [A, w]
    if embeddings is not None:
        emb = embeddings.detach().float()
        profile = emb[act_ids].mean(dim=(0, 1))
        feats = emb[ids].mean(dim=1)
        sim = torch.nn.functional.cosine_similarity(feats, profile[None], dim=-1)
    else:  # bag-of-tokens cosine without a [pool, vocab] matrix: dot = sum of profile counts, |w|^2 = sum count^2
        vocab = int(max(int(ids.max()), int(act_ids.max()))) + 1
        profile = torch.bincount(act_ids.reshape(-1), minlength=vocab).float()
        dot = profile[ids].sum(1)
        sq = (ids[:, :, None] == ids[:, None, :]).sum((1, 2)).float()
        sim = dot / (sq.sqrt() * profile.norm()).clamp_min(1e-12)
    return [pool[i] for i in torch.argsort(sim, descending=True, stable=True).tolist()]
