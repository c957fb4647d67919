"""CounterFact-style metrics for REMEDI editors, with percentile-bootstrap CIs over samples.

For a sample, ``p̃`` is the model with that sample's edit (its direction added at its entity's last
token) and ``p`` the unedited model; both are reported, so every edited figure has its baseline.

* **efficacy** on the sample's ``prompt``: score ``mean[p̃(new) > p̃(true)]``, magnitude
  ``mean(p̃(new) − p̃(true))``;
* **paraphrase**: the same on ``paraphrase_prompts`` (the edit lands on the entity in each), averaged
  per sample first, then over samples (as ROME does);
* **neighborhood**: ``mean[p̃(t_j) > p̃(new)]`` and ``mean(p̃(t_j) − p̃(new))`` on ``neighborhood_prompts``
  with ``t_j`` their own true target (``neighborhood_targets``, else ``target_true``). Our exact choice: the
  sample's edit is *active* while the neighborhood prompts run and lands wherever the sample's entity
  occurs in them — what REMEDI does at inference. Neighborhood prompts are about other subjects, so
  usually it lands nowhere and the score equals the unedited model's (which is measured, not assumed to
  be 1.0; ``neighborhood_rows_edited`` counts the prompts that did mention the entity). An edit that
  leaked onto other tokens would show up here as a drop against the unedited figure;
* **neighborhood_transfer** (only for samples with ``neighborhood_entities``, the subject of each
  neighborhood prompt; :func:`add_neighbor_entities` finds them): the stricter reading, the sample's
  direction added at the *neighbor's* entity ("where the entity would be"). It measures how specific
  the direction is to the entity it was computed for; an editor that ignores the entity moves the
  neighbor too, so expect this to fall well below the unedited score;
* **fluency**: ROME's weighted n-gram entropy (``mean(2/3·H₂, 4/3·H₃)`` in bits over word bigrams and
  trigrams) of greedy generations from ``generation_prompts`` (else the prompt), prompt text included.

Targets are scored on their first token by default; ``full_sequence_targets=True`` compares the
per-token geometric mean probability of whole targets (ROME's mean-NLL comparison).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from intervene.intervenable import Intervenable
from intervene.methods.remedi.intervention import Remedi
from intervene.methods.remedi.states import left_pad, model_device, pad_id_of, prompt_entity_tokens
from intervene.methods.remedi.train import check_samples, target_ids

__all__ = ["add_neighbor_entities", "evaluate_remedi", "mean_ci", "n_gram_entropy", "score_targets"]


def n_gram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency: arithmetic mean of ``weight_n · H(n-grams)`` (bits) over word n-grams of ``text``."""
    words = re.findall(r"\w+|[^\w\s]", text)
    out = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        out.append(w * h)
    return sum(out) / len(out)


def mean_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """``{"estimate", "lower", "upper", "n"}``: the mean and a percentile-bootstrap ``1 − alpha`` interval."""
    if len(values) == 0:
        return {"estimate": None, "lower": None, "upper": None, "n": 0}
    from intervene.probes.metrics import bootstrap_ci

    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    est, lo, hi = bootstrap_ci(lambda _y, p: p.mean(-1), torch.zeros_like(v), v, n=n_boot, seed=seed, alpha=alpha)
    return {"estimate": float(est), "lower": float(lo), "upper": float(hi), "n": len(values)}


@torch.no_grad()
def score_targets(ivm: Intervenable, remedi: Remedi, tok: Any, prompts: Sequence[str], entities: Sequence[str],
                  directions: torch.Tensor, targets_a: Sequence[str], targets_b: Sequence[str], edited: bool = True,
                  full_sequence: bool = False, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``[n]`` of ``targets_a`` and ``targets_b`` after each prompt.

    Row ``i`` is edited with ``directions[i]`` ``[n, hidden]`` at the last token of ``entities[i]`` where
    it occurs in ``prompts[i]`` (nowhere otherwise); ``edited=False`` runs the base model. First target
    token, or with ``full_sequence`` the geometric mean of the target's per-token probabilities.
    """
    device, pad = model_device(ivm.model), pad_id_of(tok)
    out_a: list[float] = []
    out_b: list[float] = []

    def run(seqs: list[list[int]], pos: list[tuple[int, ...]], dirs: torch.Tensor) -> torch.Tensor:
        ids, mask = left_pad(seqs, pad, device)
        with remedi.editing_with(dirs, pos, prompt_only=True), (contextlib.nullcontext() if edited else ivm.disabled()):
            return torch.log_softmax(ivm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)

    def read(logp: torch.Tensor, seqs: list[list[int]], plen: list[int], tids: list[list[int]]) -> list[float]:
        vals = []
        for b, (q, n_p, t) in enumerate(zip(seqs, plen, tids)):
            start = logp.shape[1] - len(q) + n_p - 1  # the column predicting the target's first token
            t = t if full_sequence else t[:1]
            lp = logp[b, torch.arange(start, start + len(t), device=device), torch.tensor(t, device=device)]
            vals.append(float(lp.mean().exp()))
        return vals

    for s in range(0, len(prompts), batch_size):
        seqs, pos = prompt_entity_tokens(tok, prompts[s:s + batch_size], entities[s:s + batch_size], required=False)
        dirs = directions[s:s + batch_size]
        plen = [len(q) for q in seqs]
        ta = [target_ids(tok, t) for t in targets_a[s:s + batch_size]]
        tb = [target_ids(tok, t) for t in targets_b[s:s + batch_size]]
        if full_sequence:  # one teacher-forced pass per target
            for tids, out in ((ta, out_a), (tb, out_b)):
                full = [q + t for q, t in zip(seqs, tids)]
                out += read(run(full, pos, dirs), full, plen, tids)
        else:  # one pass scores both first tokens
            logp = run(seqs, pos, dirs)
            out_a += read(logp, seqs, plen, ta)
            out_b += read(logp, seqs, plen, tb)
    return torch.tensor(out_a), torch.tensor(out_b)


def add_neighbor_entities(samples: Sequence[Mapping[str, Any]], entities: Sequence[str]) -> list[dict[str, Any]]:
    """Copies of ``samples`` with ``neighborhood_entities``: for each neighborhood prompt, the longest of
    ``entities`` it mentions (``""`` if none), so ``neighborhood_transfer`` can be measured."""
    by_length = sorted(entities, key=len, reverse=True)
    return [{**s, "neighborhood_entities": [next((e for e in by_length if e in p), "")
                                            for p in s.get("neighborhood_prompts") or []]} for s in samples]


def _per_sample(values: torch.Tensor, owner: list[int]) -> list[float]:
    """Average row values per owning sample (samples without rows are left out)."""
    sums: dict[int, list[float]] = {}
    for v, o in zip(values.tolist(), owner):
        sums.setdefault(o, []).append(v)
    return [sum(v) / len(v) for _, v in sorted(sums.items())]


@torch.no_grad()
def _generate_texts(ivm: Intervenable, remedi: Remedi, tok: Any, prompts: list[str], entities: list[str],
                    directions: torch.Tensor, edited: bool, max_new_tokens: int, batch_size: int) -> list[str]:
    device, pad = model_device(ivm.model), pad_id_of(tok)
    texts = []
    for s in range(0, len(prompts), batch_size):
        seqs, pos = prompt_entity_tokens(tok, prompts[s:s + batch_size], entities[s:s + batch_size], required=False)
        ids, mask = left_pad(seqs, pad, device)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                  pad_token_id=pad)
        with remedi.editing_with(directions[s:s + batch_size], pos, prompt_only=True):
            if edited:
                out = ivm.generate(**kw)
            else:
                with ivm.disabled():
                    out = ivm.generate(**kw)
        for b, q in enumerate(seqs):
            texts.append(tok.decode(out[b, ids.shape[1] - len(q):], skip_special_tokens=True))
    return texts


def evaluate_remedi(remedi: Remedi, model: nn.Module | Intervenable, tok: Any, samples: Sequence[Mapping[str, Any]],
                    *, full_sequence_targets: bool | None = None, fluency: bool = True, max_new_tokens: int = 32,
                    batch_size: int = 32, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Efficacy, paraphrase, neighborhood and fluency of ``remedi`` on ``samples`` (module docstring).

    Args:
        remedi: a fitted editor. model: the LM, or an ``Intervenable`` that holds ``remedi``.
        tok: the LM's fast tokenizer. samples: REMEDI samples (``intervene.data.quirky.remedi_samples``,
            :func:`intervene.data.counterfact.load_counterfact`).
        full_sequence_targets: score whole targets; default: as the editor was trained.
        fluency: generate and score fluency (the slow part). max_new_tokens: generation length.
        n_boot, seed: bootstrap resamples and seed of the CIs.

    Returns:
        ``{"n_samples", "full_sequence_targets", "neighborhood_rows_edited", "edited": {...}, "unedited":
        {...}}``; each metric is ``{"estimate", "lower", "upper", "n"}`` (``n`` samples contributing).
    """
    check_samples(samples)
    if full_sequence_targets is None:
        full_sequence_targets = bool(remedi.config.get("full_sequence_targets", False))
    ivm = model if isinstance(model, Intervenable) else Intervenable(model, [remedi], attach=False)
    if remedi not in ivm.interventions:
        raise ValueError("the Intervenable passed as model must hold this Remedi")
    attached_here = not ivm.attached
    try:
        if attached_here:
            ivm.attach()
        return _evaluate(ivm, remedi, tok, list(samples), full_sequence_targets, fluency, max_new_tokens,
                         batch_size, n_boot, seed)
    finally:
        remedi.clear_edit()
        if attached_here:
            ivm.detach()

def _evaluate(ivm: Intervenable, remedi: Remedi, tok: Any, samples: list[Mapping[str, Any]], full: bool,
              fluency: bool, max_new_tokens: int, batch_size: int, n_boot: int, seed: int) -> dict[str, Any]:
    dirs = remedi.directions(ivm.model, tok, [s["context"] for s in samples], [s["attribute"] for s in samples],
                             [s["entity"] for s in samples], batch_size)
    # Flatten every prompt family into rows (prompt, entity, owner sample, target a, target b).
    fam: dict[str, list[tuple[str, str, int, str, str]]] = {"efficacy": [], "paraphrase": [], "neighborhood": [],
                                                            "neighborhood_transfer": []}
    for i, s in enumerate(samples):
        e, new, true = s["entity"], s["target_new"], s.get("target_true")
        if true:
            fam["efficacy"].append((s["prompt"], e, i, new, true))
            fam["paraphrase"] += [(p, e, i, new, true) for p in s.get("paraphrase_prompts") or []]
        nts = list(s.get("neighborhood_targets") or [])
        nes = list(s.get("neighborhood_entities") or [])
        for j, p in enumerate(s.get("neighborhood_prompts") or []):
            t = nts[j] if j < len(nts) else true
            if t:
                fam["neighborhood"].append((p, e, i, t, new))
                if j < len(nes) and nes[j] and nes[j] in p:
                    fam["neighborhood_transfer"].append((p, nes[j], i, t, new))
    report: dict[str, Any] = {"n_samples": len(samples), "full_sequence_targets": full,
                              "neighborhood_rows_edited": sum(r[1] in r[0] for r in fam["neighborhood"])}
    for mode in ("edited", "unedited"):
        res: dict[str, Any] = {}
        for name, rows in fam.items():
            if not rows:
                continue
            owner = [r[2] for r in rows]
            pa, pb = score_targets(ivm, remedi, tok, [r[0] for r in rows], [r[1] for r in rows], dirs[owner],
                                   [r[3] for r in rows], [r[4] for r in rows], edited=mode == "edited",
                                   full_sequence=full, batch_size=batch_size)
            res[f"{name}_score"] = mean_ci(_per_sample((pa > pb).double(), owner), n_boot, seed)
            res[f"{name}_magnitude"] = mean_ci(_per_sample(pa - pb, owner), n_boot, seed)
        if fluency and max_new_tokens > 0:
            rows = [(p, s["entity"], i) for i, s in enumerate(samples)
                    for p in (s.get("generation_prompts") or [s["prompt"]])]
            owner = [r[2] for r in rows]
            texts = _generate_texts(ivm, remedi, tok, [r[0] for r in rows], [r[1] for r in rows], dirs[owner],
                                    mode == "edited", max_new_tokens, batch_size)
            ent = torch.tensor([n_gram_entropy(t) for t in texts], dtype=torch.float64)
            res["fluency"] = mean_ci(_per_sample(ent, owner), n_boot, seed)
        report[mode] = res
    return report
