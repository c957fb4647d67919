"""Fitting ReFT: rows → (prompt tokens, first target token), the trainer run with last-token cross-entropy.

The intervention edits its own positions (``"last"``: the prompt's last token); batches are left padded, so the
last column is every row's last prompt token, the one that predicts the target, and only its logits are
computed (``logits_to_keep=1``). ``positions="all"`` edits every token of the prompt the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from intervene.errors import InterventionError
from intervene.hparams import as_dict
from intervene.intervenable import Intervenable
from intervene.methods.reft.config import ReFTConfig
from intervene.training import (
    Trainer,
    TrainResult,
    input_device,
    last_token_cross_entropy,
    model_inputs,
    pad_batch,
)


def encode_rows(tok: Any, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``{"input_ids": prompt ids, "target": first token of the target}`` per row."""
    if not rows:
        raise InterventionError("ReFT needs at least one row with a text and a target")
    out = []
    for i, r in enumerate(rows):
        if not r.get("text") or not r.get("target"):
            raise InterventionError(f"ReFT row {i} needs a 'text' and a 'target'")
        target = tok(r["target"], add_special_tokens=False)["input_ids"]
        if not target:
            raise InterventionError(f"ReFT row {i}: the target {r['target']!r} tokenizes to nothing")
        out.append({"input_ids": list(tok(r["text"])["input_ids"]), "target": int(target[0])})
    return out


def last_logits_forward(ivm: Intervenable, batch: Mapping[str, Any]) -> Any:
    """The edited model on a left-padded batch, computing only the last position's logits."""
    return ivm(**model_inputs(ivm.model, batch, logits_to_keep=1), use_cache=False)


def train_reft(reft: Any, model: nn.Module, tok: Any, rows: Sequence[Mapping[str, Any]], cfg: ReFTConfig, *,
               val_rows: Sequence[Mapping[str, Any]] | None = None, progress: bool = True,
               checkpoint_dir: str | None = None, resume: bool = False) -> TrainResult:
    """Train ``reft`` (passed in: this module sits below ``intervention.py``) in place; sets ``history_`` and
    records the outcome in ``reft.config``."""
    dev = input_device(model)
    for attr in vars(reft).values():
        if isinstance(attr, nn.Module):
            attr.to(dev)
    pad = getattr(tok, "pad_token_id", None)
    pad = int(pad if pad is not None else 0)
    trainer = Trainer(model, [reft], last_token_cross_entropy, cfg, forward=last_logits_forward,
                      collate=lambda exs: pad_batch(exs, pad), progress=progress,
                      desc=f"{type(reft).__name__} {reft.site}")
    result = trainer.fit(encode_rows(tok, rows), None if val_rows is None else encode_rows(tok, val_rows),
                         checkpoint_dir=checkpoint_dir, resume=resume)
    reft.history_ = result.history
    reft.config = {**as_dict(cfg), "n_rows": len(rows), "best_step": result.best_step,
                   "best_loss": None if result.best_loss is None else round(result.best_loss, 6)}
    return result
