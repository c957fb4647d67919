"""Fitting DAS: (base, source, counterfactual) pairs, the interchange forward, the trainer run.

A pair is ``{"base": text, "source": text, "counterfactual": answer}`` (optionally ``"choices"``: the answer
strings IIA compares, one of them the counterfactual): the counterfactual is what the high-level causal model
says the base input answers once the variable takes the source's value. Training minimises
:func:`~intervene.training.interchange_loss` (CE of the intervened last-token logits on the counterfactual's
first token) on the shared :class:`~intervene.training.Trainer`; Boundless DAS adds
``boundary_penalty · β`` and trains ``β`` at ``boundary_lr_scale`` times the rotation's rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from intervene.errors import InterventionError
from intervene.hparams import as_dict
from intervene.intervenable import Intervenable
from intervene.methods.das.config import DASConfig
from intervene.training import Trainer, TrainResult, input_device, interchange_loss, model_inputs, pad_batch

PositionList = Sequence[int] | Sequence[Sequence[int]]


def first_token(tok: Any, text: str, what: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InterventionError(f"DAS: the {what} {text!r} tokenizes to nothing")
    return int(ids[0])


def encode_pairs(tok: Any, pairs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Token ids of each pair: ``{"base": {"input_ids"}, "source": {"input_ids"}, "counterfactual": id,
    "choices": [ids]}`` (choices only when every pair has them)."""
    if not pairs:
        raise InterventionError("DAS needs at least one (base, source, counterfactual) pair")
    with_choices = all(p.get("choices") for p in pairs)
    out = []
    for i, p in enumerate(pairs):
        missing = [k for k in ("base", "source", "counterfactual") if not p.get(k)]
        if missing:
            raise InterventionError(f"DAS pair {i} lacks {missing}")
        ex: dict[str, Any] = {"base": {"input_ids": list(tok(p["base"])["input_ids"])},
                              "source": {"input_ids": list(tok(p["source"])["input_ids"])},
                              "counterfactual": first_token(tok, p["counterfactual"], "counterfactual")}
        if with_choices:
            ex["choices"] = [first_token(tok, c, "choice") for c in p["choices"]]
            if ex["counterfactual"] not in ex["choices"]:
                raise InterventionError(f"DAS pair {i}: the counterfactual is not one of its choices")
        out.append(ex)
    return out


def pad_id_of(tok: Any) -> int:
    pad = getattr(tok, "pad_token_id", None)
    return int(pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0))


class InterchangeForward:
    """``forward(ivm, batch)``: record the batch's sources at the DAS's site, run its bases with the interchange
    (only the last position's logits, which the loss reads)."""

    def __init__(self, das: Any, positions: PositionList | None = None,
                 source_positions: PositionList | None = None) -> None:
        self.das, self.positions, self.source_positions = das, positions, source_positions

    def __call__(self, ivm: Intervenable, batch: Mapping[str, Any]) -> Any:
        model = ivm.model
        dev = input_device(model)
        base = {k: batch["base"][k].to(dev) for k in ("input_ids", "attention_mask")}
        source = {k: batch["source"][k].to(dev) for k in ("input_ids", "attention_mask")}
        with self.das.interchange(model, base, source, self.positions, self.source_positions):
            return ivm(**model_inputs(model, base, logits_to_keep=1), use_cache=False)


def boundless_loss(das: Any, penalty: float) -> Any:
    """The interchange loss plus ``penalty · β`` (the mask's edge as a fraction of the width)."""

    def loss(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        ce = interchange_loss(outputs, batch)
        return ce + penalty * das.mask.boundary.clamp(1e-3, 1.0).sum().to(ce.device) if penalty else ce

    return loss


def train_das(das: Any, model: nn.Module, tok: Any, pairs: Sequence[Mapping[str, Any]], cfg: DASConfig, *,
              positions: PositionList | None = None, source_positions: PositionList | None = None,
              val_pairs: Sequence[Mapping[str, Any]] | None = None, progress: bool = True,
              checkpoint_dir: str | None = None, resume: bool = False) -> TrainResult:
    """Train ``das`` (a DAS or Boundless DAS, passed in: this module sits below ``intervention.py``) in place;
    sets ``history_`` and records the outcome in ``das.config``. See :meth:`DAS.fit`."""
    dev = input_device(model)
    for mod in (das.rotation, getattr(das, "mask", None)):
        if mod is not None:
            mod.to(dev)
    groups = None
    if hasattr(das, "mask"):  # Boundless: the edge learns at its own rate and is penalised
        loss: Any = boundless_loss(das, cfg.boundary_penalty)

        def groups(named: dict[str, nn.Parameter]) -> list[dict[str, Any]]:
            edge = [n for n in named if n.endswith("mask.boundary")]
            return [{"params": [n for n in named if n not in edge]},
                    {"params": edge, "lr": cfg.lr * cfg.boundary_lr_scale}]
    else:
        loss = interchange_loss
    train = encode_pairs(tok, pairs)
    val = encode_pairs(tok, val_pairs) if val_pairs is not None else None
    pad = pad_id_of(tok)
    trainer = Trainer(model, [das], loss, cfg, forward=InterchangeForward(das, positions, source_positions),
                      collate=lambda exs: pad_batch(exs, pad), param_groups=groups, progress=progress,
                      desc=f"{type(das).__name__} {das.site}")
    result = trainer.fit(train, val, checkpoint_dir=checkpoint_dir, resume=resume)
    das.history_ = result.history
    das.config = {**as_dict(cfg), "n_pairs": len(pairs), "best_step": result.best_step,
                  "best_loss": None if result.best_loss is None else round(result.best_loss, 6)}
    return result
