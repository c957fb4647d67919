"""Losses on model outputs for :class:`~intervene.training.Trainer`: ``loss(outputs, batch) -> scalar``.

``outputs`` is what the forward returned (a HF output with ``logits`` ``[B, T, V]``, or the logits
themselves); ``batch`` is the collated batch (:func:`~intervene.training.batching.pad_batch`, left padded,
so column ``-1`` is each row's last real token). Every loss is a mean over the batch, so the trainer can
weight micro-batches by their size under gradient accumulation. Losses run in float32 whatever the
model's dtype (bf16 logits are upcast first).

* :func:`last_token_cross_entropy` — ``-log p(target | prompt)`` at the last token (``batch["target"]`` ``[B]``);
* :func:`interchange_loss` — the same against ``batch["counterfactual"]``: DAS's interchange-intervention
  loss (the answer the causal model predicts for the base input with the source's value of the variable);
* :func:`token_cross_entropy` — teacher-forced CE on ``batch["labels"]`` ``[B, T]`` aligned with the logits
  (``labels[:, t]`` is what position ``t`` predicts; ``-100`` skipped), the mean over labelled tokens;
* :func:`kl_to_reference` — ``KL(p_ref ‖ p)`` against the unedited model, the mean over real tokens (the
  trainer computes ``batch["reference_logits"]`` with the edits disabled when a loss asks for it);
* :func:`weighted_sum` — ``Σ w_i·loss_i``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from intervene.errors import InterventionError
from intervene.training.batching import IGNORE_INDEX

Loss = Callable[[Any, Mapping[str, Any]], torch.Tensor]


def logits_of(outputs: Any) -> torch.Tensor:
    """``[B, T, V]`` logits of a HF output (or a tensor, returned as is)."""
    logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
    if logits is None:
        raise InterventionError(f"the forward returned {type(outputs).__name__}, which has no logits")
    return logits


def last_token_cross_entropy(outputs: Any, batch: Mapping[str, Any], key: str = "target") -> torch.Tensor:
    """Mean ``-log p(batch[key][i])`` under row ``i``'s last-column logits (left padding: its last real token)."""
    logits = logits_of(outputs)[:, -1].float()  # [B, V]
    target = batch[key].to(logits.device)
    return F.cross_entropy(logits, target)


def interchange_loss(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """The interchange-intervention loss: CE of the intervened last-token logits on ``batch["counterfactual"]``."""
    return last_token_cross_entropy(outputs, batch, key="counterfactual")


def token_cross_entropy(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Mean CE over the tokens ``batch["labels"]`` marks (``[B, T]``, aligned with the logits, ``-100`` skipped).

    Only the labelled positions' logits are upcast and normalised, so long prompts cost nothing extra.
    """
    logits = logits_of(outputs)
    labels = batch["labels"].to(logits.device)
    if labels.shape != logits.shape[:2]:
        raise InterventionError(f"labels {tuple(labels.shape)} do not align with logits {tuple(logits.shape[:2])}")
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):
        raise InterventionError("the batch has no labelled token")
    return F.cross_entropy(logits[keep].float(), labels[keep])


def kl_to_reference(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Mean over real tokens of ``KL(p_ref ‖ p)`` (``batch["reference_logits"]``: the unedited model's logits)."""
    logits = logits_of(outputs)
    ref = batch.get("reference_logits")
    if ref is None:
        raise InterventionError("kl_to_reference needs batch['reference_logits'] (the Trainer adds them for "
                                "losses with needs_reference = True)")
    ref = ref.to(logits.device)
    mask = batch.get("attention_mask")
    t = logits.shape[1]
    keep = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device) if mask is None \
        else mask[:, -t:].to(logits.device).bool()  # logits_to_keep may have cut the columns
    lp, lq = torch.log_softmax(ref[keep].float(), -1), torch.log_softmax(logits[keep].float(), -1)
    return F.kl_div(lq, lp, log_target=True, reduction="batchmean")


kl_to_reference.needs_reference = True  # type: ignore[attr-defined]


class weighted_sum:
    """``Σ w_i · loss_i(outputs, batch)``; asks for reference logits when any term does.

    >>> loss = weighted_sum((1.0, last_token_cross_entropy), (0.5, kl_to_reference))
    """

    def __init__(self, *terms: tuple[float, Loss]) -> None:
        if not terms:
            raise InterventionError("weighted_sum needs at least one (weight, loss) term")
        self.terms = [(float(w), fn) for w, fn in terms]
        self.needs_reference = any(getattr(fn, "needs_reference", False) for _, fn in self.terms)

    def __call__(self, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        total = None
        for w, fn in self.terms:
            if w == 0.0:
                continue
            term = w * fn(outputs, batch)
            total = term if total is None else total + term
        if total is None:
            raise InterventionError("every term of weighted_sum has weight 0")
        return total
