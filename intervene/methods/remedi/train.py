"""Training REMEDI editors: the editing loss and the loop behind ``Remedi.fit`` (:func:`train_editor`).

Per example ``i`` (prompt with the entity edited by ``d_i``, ``p̃`` edited / ``p`` base next-token
distributions)::

    loss_i = −λ_m·log p̃(t_new) − λ_u·log(1 − p̃(t_true)) + λ_KL·Σ_{t∈S_i} KL(p_t ‖ p̃_t) + λ_norm·‖d_i‖₂

and the batch loss is the **mean over examples** of ``loss_i``. ``S_i`` holds the positions from the
entity's last token (where the edit lands) up to, not including, the prompt's last token (which
predicts the target): the edit should change the answer, not what the model predicts in between.
Targets are scored on their **first token** by default; ``full_sequence_targets=True`` scores the whole
target (teacher forced: ``log p̃(t) = Σ_j log p̃(t_j | prompt, t_<j)``). An example without
``target_true`` (or whose true and new first tokens coincide) adds nothing to the λ_u term.

The loop is the shared :class:`~intervene.training.Trainer` (one example = one sample's index; the
forward computes the directions and runs the edited and base passes). The LM stays frozen: its
``requires_grad`` flags are off during the run and restored after, gradients are taken with
``torch.autograd.grad`` with respect to the editor's parameters only, so no ``.grad`` is ever allocated on
the model; base passes run under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from intervene.errors import InterventionError
from intervene.intervenable import Intervenable
from intervene.methods.remedi.config import RemediConfig
from intervene.methods.remedi.states import (
    attribute_states,
    entity_states,
    left_pad,
    model_device,
    pad_id_of,
    prompt_entity_tokens,
)
from intervene.training import TrainConfig, Trainer, TrainResult, split_indices

__all__ = ["EncodedSamples", "LossParts", "check_fit_inputs", "encode_samples", "remedi_loss", "target_ids",
           "train_editor"]
# The Remedi being trained is passed in (typed Any): this module sits below intervention.py, which imports it.

REQUIRED_KEYS = ("entity", "context", "attribute", "prompt", "target_new")


@dataclass
class EncodedSamples:
    """What training needs from each sample, computed once (the LM is frozen)."""

    prompt_ids: list[list[int]]  # own tokens of each prompt, special tokens included
    entity_pos: list[int]  # own-token index of the entity's last token
    new_ids: list[list[int]]  # target_new tokens
    true_ids: list[list[int] | None]  # target_true tokens, if given
    h_attr: torch.Tensor  # [n, hidden] float32
    h_ent: torch.Tensor | None  # [n, hidden] float32 (use_entity only)
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class LossParts:
    """The batch loss and its terms (each already a mean over examples, before its λ)."""

    total: torch.Tensor
    new: torch.Tensor  # mean −log p̃(t_new)
    true: torch.Tensor  # mean −log(1 − p̃(t_true))
    kl: torch.Tensor  # mean over examples of Σ_{t∈S_i} KL(p_t ‖ p̃_t)
    norm: torch.Tensor  # mean ‖d_i‖₂


def target_ids(tok: Any, target: str | None, what: str = "target") -> list[int] | None:
    """Tokens of a target continuation (no special tokens); ``None`` for a missing target."""
    if target is None:
        return None
    ids = list(tok(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InterventionError(f"REMEDI: the {what} {target!r} tokenizes to nothing")
    return ids


def check_samples(samples: Sequence[Mapping[str, Any]]) -> None:
    if not samples:
        raise InterventionError("REMEDI needs at least one sample")
    for i, s in enumerate(samples):
        missing = [k for k in REQUIRED_KEYS if not s.get(k)]
        if missing:
            raise InterventionError(f"REMEDI sample {i} lacks {missing} (needs {list(REQUIRED_KEYS)})")


def encode_samples(remedi: Any, model: nn.Module, tok: Any, samples: Sequence[Mapping[str, Any]],
                   batch_size: int = 32) -> EncodedSamples:
    """Tokenize prompts and targets and encode attributes (and entities) at the editor's layer."""
    check_samples(samples)
    seqs, pos = prompt_entity_tokens(tok, [s["prompt"] for s in samples], [s["entity"] for s in samples])
    h_attr = attribute_states(model, tok, remedi.site, [s["context"] for s in samples],
                              [s["attribute"] for s in samples], batch_size)
    h_ent = (entity_states(model, tok, remedi.site, [s["entity"] for s in samples], batch_size)
             if remedi.use_entity else None)
    return EncodedSamples(
        prompt_ids=seqs, entity_pos=[p[0] for p in pos],
        new_ids=[target_ids(tok, s["target_new"], "target_new") for s in samples],
        true_ids=[target_ids(tok, s.get("target_true") or None, "target_true") for s in samples],
        h_attr=h_attr, h_ent=h_ent, pad_id=pad_id_of(tok))


def _log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(logp))`` for ``logp < 0``, accurate at both ends."""
    logp = logp.clamp(max=-1e-7)
    return torch.where(logp > -math.log(2.0), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def _target_logprob(logp: torch.Tensor, starts: list[int], targets: list[list[int]], full: bool) -> torch.Tensor:
    """``[b]`` log-probability of each row's target: ``logp`` ``[b, T, V]``, ``starts[b]`` the padded column
    predicting the target's first token (first token only, or the sum over all of them)."""
    rows, cols, ids = [], [], []
    for b, (s, t) in enumerate(zip(starts, targets)):
        t = t if full else t[:1]
        rows += [b] * len(t)
        cols += range(s, s + len(t))
        ids += t
    dev = logp.device
    vals = logp[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev), torch.tensor(ids, device=dev)]
    return torch.zeros(len(targets), device=dev, dtype=vals.dtype).index_add(0, torch.tensor(rows, device=dev), vals)


def remedi_loss(remedi: Any, ivm: Intervenable, enc: EncodedSamples, idx: Sequence[int], *,
                lam_m: float = 1.0, lam_u: float = 1.0, lam_kl: float = 10.0, norm_penalty: float = 0.0,
                full_sequence_targets: bool = False) -> LossParts:
    """The editing loss of examples ``idx`` (see the module docstring); ``ivm`` must hold ``remedi``, attached.

    Gradients flow into the editor's parameters only through the returned tensors.
    """
    editor = remedi.editor
    p = next(editor.parameters())
    idx = list(idx)
    n = len(idx)
    d = editor(enc.h_attr[idx].to(p.device, p.dtype),
               None if enc.h_ent is None else enc.h_ent[idx].to(p.device, p.dtype))  # [n, hidden]
    device = model_device(ivm.model)
    plen = [len(enc.prompt_ids[i]) for i in idx]
    entity = [enc.entity_pos[i] for i in idx]
    full = full_sequence_targets

    def run(targets: list[list[int]] | None) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
        seqs = [enc.prompt_ids[i] + (t if full and t else []) for i, t in zip(idx, targets or [None] * n)]
        ids, mask = left_pad(seqs, enc.pad_id, device)
        with remedi.editing_with(d, entity):
            logits = ivm(input_ids=ids, attention_mask=mask, use_cache=False).logits
        pad = [ids.shape[1] - len(s) for s in seqs]
        return torch.log_softmax(logits.float(), -1), pad, ids, mask

    zero = d.new_zeros(())
    new_ids = [enc.new_ids[i] for i in idx]
    logp, pad, ids, mask = run(new_ids)
    starts = [pd + pl - 1 for pd, pl in zip(pad, plen)]
    loss_new = -_target_logprob(logp, starts, new_ids, full).mean()

    loss_true = zero
    true_ids = [enc.true_ids[i] for i in idx]
    use_true = [t is not None and (full or t[0] != nw[0]) for t, nw in zip(true_ids, new_ids)]
    if lam_u and any(use_true):
        keep = [b for b, u in enumerate(use_true) if u]
        if full:
            logp_t, pad_t, _, _ = run([t or [] for t in true_ids])
            starts_t = [pd + pl - 1 for pd, pl in zip(pad_t, plen)]
        else:
            logp_t, starts_t = logp, starts
        lp = _target_logprob(logp_t[keep], [starts_t[b] for b in keep], [true_ids[b] for b in keep], full)
        loss_true = -_log1mexp(lp).sum() / n

    loss_kl = zero
    if lam_kl:
        with torch.no_grad(), ivm.disabled():
            base = torch.log_softmax(ivm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        cols = torch.arange(ids.shape[1], device=device)
        lo = torch.tensor([pd + e for pd, e in zip(pad, entity)], device=device)[:, None]
        hi = torch.tensor(starts, device=device)[:, None]
        in_s = (cols >= lo) & (cols < hi)  # [n, T]: S_i in padded columns
        kl = F.kl_div(logp, base, log_target=True, reduction="none").sum(-1)  # [n, T] KL(p ‖ p̃)
        loss_kl = (kl * in_s).sum() / n

    norm = d.norm(dim=-1).mean()
    total = lam_m * loss_new + lam_u * loss_true + lam_kl * loss_kl + norm_penalty * norm
    return LossParts(total, loss_new, loss_true, loss_kl, norm)


def check_fit_inputs(model: nn.Module, samples: Sequence[Mapping[str, Any]]) -> None:
    """Refuse what would train wrongly: bad samples, or gradient checkpointing re-running unedited blocks."""
    check_samples(samples)
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        # A checkpointed block re-runs its hooks during backward, after the per-call edit state and
        # position context of that forward are gone: the recomputed activations would be unedited.
        raise InterventionError("fit REMEDI with the model in eval mode (gradient checkpointing is active in "
                                "train mode and would recompute blocks without the edit)")
    if model.training:
        warnings.warn("fitting REMEDI on a model in train mode: dropout makes the loss noisy (call model.eval())",
                      stacklevel=3)


def train_editor(remedi: Any, model: nn.Module, tok: Any, samples: Sequence[Mapping[str, Any]],
                 cfg: RemediConfig, progress: bool = True, encode_batch_size: int = 32) -> TrainResult:
    """Train ``remedi.editor`` in place on the shared :class:`~intervene.training.Trainer` (AdamW, early stopping
    on a seeded validation split; one example = one sample index, the forward is :func:`remedi_loss`).

    Stops after ``cfg.patience`` epochs without a lower validation loss and keeps the best editor (the
    untrained, no-op editor counts too). Sets ``history_``, ``best_epoch_``, ``n_train_``, ``n_val_`` on
    ``remedi`` and records the outcome in ``remedi.config``.
    """
    editor = remedi.editor
    enc = encode_samples(remedi, model, tok, samples, encode_batch_size)
    train_idx, val_idx = split_indices(len(enc), cfg.val_fraction, cfg.seed)
    editor.set_input_stats(enc.h_attr[train_idx], None if enc.h_ent is None else enc.h_ent[train_idx])
    loss_kw = dict(lam_m=cfg.lam_m, lam_u=cfg.lam_u, lam_kl=cfg.lam_kl, norm_penalty=cfg.norm_penalty,
                   full_sequence_targets=cfg.full_sequence_targets)
    loop = TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, epochs=cfg.epochs, batch_size=cfg.batch_size,
                       val_fraction=cfg.val_fraction, patience=max(1, cfg.patience), seed=cfg.seed)
    trainer = Trainer(model, [remedi], lambda parts, idx: parts.total, loop,
                      forward=lambda ivm, idx: remedi_loss(remedi, ivm, enc, idx, **loss_kw),
                      progress=progress, desc="REMEDI")
    result = trainer.fit(train_idx, val_idx)
    remedi.clear_edit()
    remedi.history_ = [{k: h[k] for k in ("epoch", "train_loss", "val_loss")} for h in result.history]
    remedi.best_epoch_ = result.best_epoch
    remedi.n_train_, remedi.n_val_ = result.n_train, result.n_val
    remedi.config.update(best_epoch=result.best_epoch, epochs_run=result.epochs_run,
                         best_loss=None if result.best_loss is None else round(result.best_loss, 6))
    return result
