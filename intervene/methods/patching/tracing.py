"""Causal tracing (Meng, Bau, Andonian & Belinkov, ROME, 2022): where does a model recall a fact?

Per prompt, with the answer ``o`` (the clean run's top token unless given):

1. clean run: ``p_clean = P(o)``;
2. corrupted runs: Gaussian noise ``ν·ε`` added to the token embeddings of the subject (``samples`` draws,
   ``ν`` = 3x the standard deviation of subject-token embeddings by default, as the paper); ``p_corrupt``
   = the mean of ``P(o)`` over the draws;
3. restored runs: the corrupted runs with one clean state copied back — the block output at
   (token ``t``, layer ``l``) for ``kind="hidden"``, or the MLP / attention outputs of the ``window``
   layers around ``l`` (``[l − w/2, l + w/2)``, clipped) at ``t`` for ``"mlp"`` / ``"attn"``.

The indirect effect of a state is ``IE = p_restored − p_corrupt`` (the paper's, not normalised); the
total effect is ``p_clean − p_corrupt``. Every restored cell reuses the same noise draws (a draw is a
function of the seed, the sample and the position), and many cells share one forward. Over a dataset,
:func:`trace_dataset` averages the effects (AIE) by token bucket — first / middle / last subject token,
first subsequent token, further tokens, last token — with 95% intervals, skipping facts the model gets
wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from intervene.errors import InterventionError
from intervene.hparams import make_config
from intervene.intervenable import Intervenable
from intervene.methods.patching.config import TraceConfig
from intervene.methods.patching.exchange import attached_with
from intervene.methods.patching.intervention import Noise, Patch
from intervene.methods.patching.record import model_of, record
from intervene.sites import num_layers

KINDS = ("hidden", "mlp", "attn")
_SITE = {"hidden": "layers.{}", "mlp": "layers.{}.mlp", "attn": "layers.{}.attn"}
BUCKETS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
           "further tokens", "last token")


def embedding_site(model: nn.Module) -> str:
    """The raw site of the token embedding module's output (where ROME adds its noise)."""
    emb = model.get_input_embeddings()
    for name, mod in model.named_modules():
        if mod is emb:
            return f"{name}:output"
    raise InterventionError("the model's input embedding module is not among its submodules")


def subject_tokens(tok: Any, prompt: str, subject: str) -> list[int]:
    """Own-token indices of the first occurrence of ``subject`` in ``prompt`` (character offsets)."""
    start = prompt.find(subject)
    if start < 0:
        raise InterventionError(f"the subject {subject!r} does not occur in {prompt!r}")
    if not getattr(tok, "is_fast", False):
        raise InterventionError("causal tracing needs a fast tokenizer (character offsets locate the subject)")
    enc = tok(prompt, return_offsets_mapping=True)
    end = start + len(subject)
    idx = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    if not idx:
        raise InterventionError(f"no token of {prompt!r} covers the subject {subject!r}")
    return idx


@torch.no_grad()
def noise_level(model: nn.Module, tok: Any, prompts: Sequence[str], subjects: Sequence[str],
                multiplier: float = 3.0) -> float:
    """``multiplier`` x the standard deviation of the token embeddings of the subjects (ROME's ``s3`` rule)."""
    emb = model.get_input_embeddings()
    rows = []
    for prompt, subject in zip(prompts, subjects):
        ids = tok(prompt, return_tensors="pt")["input_ids"][0]
        rows.append(emb(ids[subject_tokens(tok, prompt, subject)].to(emb.weight.device)).float().cpu())
    if not rows:
        raise InterventionError("noise_level needs at least one prompt")
    return float(multiplier * torch.cat(rows).std())


@dataclass
class TraceResult:
    """One prompt's trace: ``scores[kind]`` ``[tokens, layers]`` is ``P(answer)`` with that state restored."""

    prompt: str
    subject: str
    answer: str
    tokens: list[str]
    subject_range: tuple[int, int]
    clean: float
    corrupted: float
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    window: int = 10

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """``[tokens, layers]``: ``p_restored − p_corrupt``."""
        return self.scores[kind] - self.corrupted

    @property
    def total_effect(self) -> float:
        return self.clean - self.corrupted

    def plot(self, path: str | Path) -> Path:
        """The paper's three heat maps (tokens x layers; subject tokens starred), side by side."""
        from intervene.methods.patching.plots import plot_trace

        labels = [t + ("*" if self.subject_range[0] <= i < self.subject_range[1] else "")
                  for i, t in enumerate(self.tokens)]
        return plot_trace(self.scores, labels, self.corrupted, path,
                          f"P({self.answer!r}) restored: clean {self.clean:.3f}, corrupted {self.corrupted:.3f}",
                          self.window)


def trace(model: nn.Module | Intervenable, tok: Any, prompt: str, subject: str, answer: str | None = None,
          config: TraceConfig | None = None, *, noise: float | None = None, batch_size: int = 256,
          **hyperparameters: Any) -> TraceResult:
    """Trace one prompt (see the module docstring).

    Args:
        model, tok: a causal LM (or an ``Intervenable``) and its fast tokenizer.
        prompt, subject: the fact's prompt and the subject named in it (its first occurrence is noised).
        answer: the expected continuation (default: the clean run's top token).
        config: a :class:`TraceConfig`; keyword ``hyperparameters`` (``window=1``) override its fields.
        noise: ``ν`` itself (default: ``noise_multiplier`` x :func:`noise_level` of this prompt's subject).
        batch_size: rows per forward (cells x samples).
    """
    cfg = make_config(TraceConfig, config, **hyperparameters)
    m = model_of(model)
    samples, kinds, window, seed = cfg.samples, cfg.kinds, cfg.window, cfg.seed
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise InterventionError(f"kinds must be among {KINDS}, got {kinds}")
    enc = tok(prompt, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    n_tok, n_layers = int(inputs["input_ids"].shape[1]), num_layers(m)
    subj = subject_tokens(tok, prompt, subject)
    nu = noise_level(m, tok, [prompt], [subject], cfg.noise_multiplier) if noise is None else float(noise)
    sites = sorted({_SITE[k].format(layer) for k in kinds for layer in range(n_layers)})
    with torch.no_grad():
        clean_acts, out = record(model, inputs, sites, use_cache=False)
    probs = torch.softmax(out.logits[0, -1].float(), -1)
    target = int(probs.argmax()) if answer is None else _first_token(tok, answer)
    result = TraceResult(prompt, subject, tok.decode([target]), [tok.decode([i]) for i in inputs["input_ids"][0]],
                         (subj[0], subj[-1] + 1), float(probs[target]), 0.0, window=window)
    emb = embedding_site(m)

    def run(cells: list[list[tuple[str, int]]]) -> torch.Tensor:
        """P(target) for ``samples`` noisy rows per cell (a cell: the (site, token) states it restores)."""
        rows = len(cells) * samples
        ids = {k: v.expand(rows, -1) for k, v in inputs.items()}
        patches = []
        for site in sorted({s for cell in cells for s, _ in cell}):
            values = torch.zeros(rows, 1, *clean_acts[site].shape[2:], dtype=clean_acts[site].dtype)
            own: list[list[int]] = [[] for _ in range(rows)]
            for c, cell in enumerate(cells):
                for s, t in cell:
                    if s == site:
                        for r in range(c * samples, (c + 1) * samples):
                            own[r] = [t]
                            values[r, 0] = clean_acts[site][0, t]
            patches.append(Patch({site: values}, positions={"per_example": own}, per_example=True,
                                 name=f"restore_{len(patches)}"))
        noise_iv = Noise(emb, nu, positions=subj, seed=seed, name="subject_noise",
                         example_ids=[r % samples for r in range(rows)])
        with torch.no_grad(), attached_with(model, [noise_iv, *patches]) as ivm:
            logits = ivm(**ids, use_cache=False).logits[:, -1].float()
        return torch.softmax(logits, -1)[:, target].view(len(cells), samples).mean(-1)

    result.corrupted = float(run([[]])[0])
    per_forward = max(1, batch_size // samples)
    for kind in kinds:
        grid = [[(_SITE[kind].format(w), t) for w in _window(kind, layer, n_layers, window)]
                for t in range(n_tok) for layer in range(n_layers)]
        vals = torch.cat([run(grid[s:s + per_forward]) for s in range(0, len(grid), per_forward)])
        result.scores[kind] = vals.view(n_tok, n_layers)
    return result


def _window(kind: str, layer: int, n_layers: int, window: int) -> list[int]:
    if kind == "hidden":
        return [layer]
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _first_token(tok: Any, answer: str) -> int:
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InterventionError(f"the answer {answer!r} tokenizes to nothing")
    return int(ids[0])


@dataclass
class DatasetTrace:
    """Average indirect effects by token bucket: ``aie[kind]`` ``[buckets, layers]`` and their 95% half-widths."""

    aie: dict[str, torch.Tensor]
    ci: dict[str, torch.Tensor]
    total_effect: float
    n: int
    skipped: int
    window: int
    traces: list[TraceResult] = field(default_factory=list)

    def plot(self, path: str | Path) -> Path:
        from intervene.methods.patching.plots import plot_trace

        return plot_trace({k: v for k, v in self.aie.items()}, list(BUCKETS), 0.0, path,
                          f"average indirect effect over {self.n} facts (total effect {self.total_effect:.3f})",
                          self.window, label="AIE")

    def peak(self, kind: str, rows: Sequence[int] | None = None) -> tuple[str, int, float]:
        """``(bucket, layer, AIE)`` of the largest average indirect effect of ``kind`` (among bucket ``rows``)."""
        rows = list(range(len(BUCKETS))) if rows is None else list(rows)
        a = torch.nan_to_num(self.aie[kind][rows], nan=-math.inf)
        i = int(torch.argmax(a))
        return BUCKETS[rows[i // a.shape[1]]], i % a.shape[1], float(a.reshape(-1)[i])

    def peak_within(self, kind: str, rows: Sequence[int]) -> tuple[str, int]:
        """``(bucket, layer)`` of the largest AIE of ``kind`` among bucket ``rows`` (e.g. the subject's)."""
        bucket, layer, _ = self.peak(kind, rows)
        return bucket, layer


def buckets(n_tokens: int, subject: tuple[int, int]) -> list[list[int]]:
    """Token indices of each of :data:`BUCKETS` (a bucket may be empty)."""
    s, e = subject
    last = n_tokens - 1
    out = [[s], list(range(s + 1, e - 1)), [e - 1], [e] if e < last else [], list(range(e + 1, last)), [last]]
    return [[i for i in b if 0 <= i <= last] for b in out]


def trace_dataset(model: nn.Module | Intervenable, tok: Any, items: Sequence[Mapping[str, str]],
                  config: TraceConfig | None = None, *, noise: float | None = None, progress: bool = True,
                  keep: bool = False, **hyperparameters: Any) -> DatasetTrace:
    """:func:`trace` over items with ``prompt``, ``subject`` and ``answer``; facts whose clean top token is not
    the answer's first token are skipped (as ROME). ``noise`` defaults to ``noise_multiplier`` x
    :func:`noise_level` over all items; ``keep`` keeps every fact's :class:`TraceResult`."""
    cfg = make_config(TraceConfig, config, **hyperparameters)
    m = model_of(model)
    if noise is None:
        noise = noise_level(m, tok, [i["prompt"] for i in items], [i["subject"] for i in items],
                            cfg.noise_multiplier)
    kinds, window = cfg.kinds, cfg.window
    per_kind: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    totals, kept, skipped = [], [], 0
    for item in tqdm(items, desc="causal tracing", unit="fact", disable=not progress):
        res = trace(model, tok, item["prompt"], item["subject"], None, cfg, noise=noise)
        if "answer" in item and tok.decode([_first_token(tok, item["answer"])]) != res.answer:
            skipped += 1
            continue
        groups = buckets(len(res.tokens), res.subject_range)
        for k in kinds:
            ie = res.indirect_effect(k)
            per_kind[k].append(torch.stack([ie[g].mean(0) if g else torch.full((ie.shape[1],), float("nan"))
                                            for g in groups]))
        totals.append(res.total_effect)
        if keep:
            kept.append(res)
    if not totals:
        raise InterventionError("every fact was skipped: the model answers none of them correctly")
    aie, ci = {}, {}
    for k, rows in per_kind.items():
        x = torch.stack(rows)  # [facts, buckets, layers]
        aie[k] = x.nanmean(0)
        count = (~torch.isnan(x)).sum(0).clamp_min(1)
        dev = torch.sqrt(torch.nansum((x - aie[k]) ** 2, 0) / (count - 1).clamp_min(1))
        ci[k] = 1.96 * dev / count.sqrt()
    return DatasetTrace(aie, ci, float(sum(totals) / len(totals)), len(totals), skipped, window, kept)
