"""Interchange intervention accuracy (IIA) and the quirky speaker-swap pairs.

IIA (Geiger et al. 2023) is the fraction of held-out (base, source) pairs whose intervened answer is the
counterfactual one. With ``choices`` the answer is the argmax over the pair's choice tokens (the demo's
True/False), else over the vocabulary. We report beside it what a no-op gets (``no_intervention``: the base
run's own answer against the counterfactual) and IIA on the pairs where the two differ (``iia_changed``):
there the interchange must flip the answer to score.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from intervene.errors import InterventionError
from intervene.intervenable import Intervenable
from intervene.methods.das.fit import InterchangeForward, PositionList, encode_pairs, pad_id_of
from intervene.methods.das.intervention import DAS
from intervene.training import logits_of, pad_batch


@torch.no_grad()
def iia(das: DAS, target: nn.Module | Intervenable, tok: Any, pairs: Sequence[Mapping[str, Any]],
        positions: PositionList | None = None, source_positions: PositionList | None = None,
        batch_size: int = 64) -> dict[str, Any]:
    """IIA of ``das`` on ``pairs`` (see the module docstring): ``{"iia", "no_intervention", "iia_changed",
    "n", "n_changed"}``. ``target`` is the model or an ``Intervenable`` holding ``das``."""
    ivm = target if isinstance(target, Intervenable) else Intervenable(target, [das], attach=False)
    if das not in ivm.interventions:
        raise InterventionError(f"{das.name} is not in the Intervenable being evaluated")
    forward = InterchangeForward(das, positions, source_positions)
    examples = encode_pairs(tok, pairs)
    pad = pad_id_of(tok)
    hit, base_hit = [], []
    was = ivm.attached
    ivm.attach()
    try:
        for s in range(0, len(examples), batch_size):
            batch = pad_batch(examples[s:s + batch_size], pad)
            cf = batch["counterfactual"]
            preds = []
            for enabled in (True, False):
                if enabled:
                    logits = logits_of(forward(ivm, batch))[:, -1].float().cpu()
                else:
                    with ivm.disabled():
                        logits = logits_of(forward(ivm, batch))[:, -1].float().cpu()
                if "choices" in batch:
                    choices = torch.tensor(batch["choices"])
                    preds.append(choices.gather(1, logits.gather(1, choices).argmax(-1, keepdim=True))[:, 0])
                else:
                    preds.append(logits.argmax(-1))
            hit += (preds[0] == cf).tolist()
            base_hit += (preds[1] == cf).tolist()
    finally:
        if not was:
            ivm.detach()
    changed = [h for h, b in zip(hit, base_hit) if not b]
    return {"iia": sum(hit) / len(hit), "no_intervention": sum(base_hit) / len(base_hit),
            "iia_changed": sum(changed) / len(changed) if changed else None, "n": len(hit), "n_changed": len(changed)}


def speaker_swap_pairs(rows: Sequence[Mapping[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """DAS pairs for the quirky speaker: each row is a base; its source is the *other* character's prompt on
    another question, and the counterfactual is what that other character would answer on the base's question.

    An interchange that carries "who is judging" (and not the source's question) makes Bob answer the
    base question like Alice (the truth) and Alice like Bob. Rows are :func:`intervene.data.quirky.quirky_dataset`
    rows; ``character_label`` of the base row is its unintervened answer.
    """
    rng = random.Random(seed)
    by_char: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_char.setdefault(r["character"], []).append(r)
    if set(by_char) != {"Alice", "Bob"}:
        raise InterventionError("speaker swaps need rows of both Alice and Bob")
    out = []
    for b in rows:
        other = "Bob" if b["character"] == "Alice" else "Alice"
        pool = by_char[other]
        for _ in range(50):
            s = pool[rng.randrange(len(pool))]
            if s["question_id"] != b["question_id"]:
                break
        label = b["alice_label"] if other == "Alice" else b["bob_label"]
        out.append({"base": b["text"], "source": s["text"], "counterfactual": b["choices"][label],
                    "choices": list(b["choices"]), "base_character": b["character"],
                    "base_answer": b["choices"][b["character_label"]]})
    return out
