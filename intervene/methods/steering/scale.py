"""Choosing a steering scale: in units of the activation norm, by a sweep that reports effect and cost.

A steering vector's effect depends on its size relative to the activations it is added to: a unit
probe direction at ``scale=8`` is invisible on a model whose residual stream has norm 60, and
overwhelming on one whose norm is 2. So:

* :func:`activation_norm` measures the mean norm of the activation at a site on some text: express
  the scale as a fraction of it (``scale = 0.5 * norm`` for a unit direction is a strong push; ``0.1``
  is a nudge);
* :func:`scale_sweep` tries several scales and reports, for each, the effect you care about (any
  function of the steered model) and the cost: cross-entropy increase and KL on neutral text, with
  the edit at every position;
* :func:`choose_scale` picks the smallest scale that reaches most of the best effect within a CE budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from intervene.methods.steering.intervention import Steering


@torch.no_grad()
def activation_norm(model: Any, tok: Any, texts: Sequence[str], site: str, batch_size: int = 16,
                    max_length: int = 128) -> float:
    """Mean L2 norm of the activation at ``site`` over the real tokens of ``texts``.

    Each text's first token is left out: many models give it an outsized norm (an "attention sink"),
    which says nothing about the tokens a steering vector acts on.
    """
    from intervene.hooks import HookSet, add_input_hook, add_output_hook
    from intervene.sites import resolve_site

    resolved = resolve_site(model, site)
    seen: list[torch.Tensor] = []

    def grab(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.detach().float().flatten(2).norm(dim=-1))  # [batch, seq] (head sites flattened)
        return h

    hooks = HookSet()
    (add_input_hook if resolved.side == "input" else add_output_hook)(hooks, resolved.module, grab, site)
    total, count = 0.0, 0
    side = tok.padding_side
    tok.padding_side = "right"  # the first real token is then column 0 of every row
    try:
        device = next(model.parameters()).device
        for start in range(0, len(texts), batch_size):
            batch = tok(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length).to(device)
            seen.clear()
            model(**batch)
            mask = batch["attention_mask"].bool().clone()
            mask[:, 0] = False
            norms = seen[0].to(mask.device)
            total += float(norms[mask].sum())
            count += int(mask.sum())
    finally:
        hooks.remove()
        tok.padding_side = side
    if count == 0:
        raise ValueError("no tokens to measure: pass texts of at least two tokens")
    return total / count


def scale_sweep(model: Any, tok: Any, steering: Steering, scales: Sequence[float],
                effect: Callable[[Any], float], ref_texts: Sequence[str] = (), batch_size: int = 16
                ) -> list[dict[str, float]]:
    """Evaluate ``steering`` at each of ``scales``: ``effect(model)`` with the edit attached, and its cost.

    ``effect`` is any number you want to move (an accuracy, a probability, a probe score), computed by
    calling the model it is given. The cost, on ``ref_texts`` with the edit at every position, is
    ``ce_delta`` (nats per token over the base model) and ``kl``; without ``ref_texts`` it is not
    measured. Returns one row per scale: ``{"scale", "effect", "ce_delta", "kl"}``. The steering's own
    scale is restored afterwards.
    """
    from intervene.evaluate.side_effects import side_effects
    from intervene.intervenable import Intervenable

    original = steering.scale
    rows = []
    try:
        for s in scales:
            steering.scale = float(s)
            with Intervenable(model, [steering]) as ivm:
                value = float(effect(ivm.model))
            row = {"scale": float(s), "effect": value, "ce_delta": float("nan"), "kl": float("nan")}
            if ref_texts:
                fx = side_effects(model, tok, list(ref_texts), steering, batch_size=batch_size) if s != 0 else \
                    {"ce_delta": 0.0, "kl": 0.0}
                row.update(ce_delta=float(fx["ce_delta"]), kl=float(fx["kl"]))
            rows.append(row)
    finally:
        steering.scale = original
    return rows


def choose_scale(rows: Sequence[dict[str, float]], max_ce_delta: float = 0.5, keep: float = 0.9
                 ) -> dict[str, float]:
    """The row of the smallest ``|scale|`` whose effect reaches ``keep`` of the best gain over scale 0,
    among the rows costing at most ``max_ce_delta`` nats (a larger effect is better)."""
    base = next((r for r in rows if r["scale"] == 0), None)
    ok = [r for r in rows if not r["ce_delta"] > max_ce_delta]  # NaN (cost not measured) counts as within budget
    if not ok:
        raise ValueError(f"every scale costs more than {max_ce_delta} nats of CE: try smaller scales")
    best = max(r["effect"] for r in ok)
    floor = (base["effect"] if base else min(r["effect"] for r in ok))
    target = floor + keep * (best - floor)
    return min((r for r in ok if r["effect"] >= target), key=lambda r: abs(r["scale"]))
