"""Batches for training: token lists padded into tensors, and the keyword arguments a forward needs.

Training examples are plain dicts of token lists and scalars (``{"input_ids": [...], "target": 17}``;
nested dicts such as a DAS pair's ``{"base": {...}, "source": {...}}`` are padded alike), so they can be
shuffled, split and checkpointed by index without holding tensors. :func:`pad_batch` turns a list of them
into tensors; padding is on the left by default, so column ``-1`` is every row's last real token (the one
that predicts the answer).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from intervene.errors import InterventionError

IGNORE_INDEX = -100  # label value the losses skip (the convention of torch's cross_entropy and HF)



def pad_tokens(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "left"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [n, T], attention_mask [n, T])`` of token lists padded to the longest on ``side``."""
    if side not in ("left", "right"):
        raise InterventionError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            raise InterventionError(f"example {i} has no tokens")
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def pad_batch(examples: Sequence[Mapping[str, Any]], pad_id: int, side: str = "left") -> dict[str, Any]:
    """Collate examples into tensors.

    ``input_ids`` lists become ``input_ids`` / ``attention_mask`` ``[n, T]`` (``pad_id`` where padded);
    ``labels`` lists (one per token, aligned with ``input_ids``) are padded with ``IGNORE_INDEX``; ints and
    floats become ``[n]`` tensors; nested dicts are collated recursively; anything else is kept as a list.
    """
    if not examples:
        raise InterventionError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in examples[0]:
        vals = [ex[key] for ex in examples]
        if key == "input_ids":
            out["input_ids"], out["attention_mask"] = pad_tokens(vals, pad_id, side)
        elif key == "labels":
            out["labels"], _ = pad_tokens(vals, IGNORE_INDEX, side)
        elif isinstance(vals[0], Mapping):
            out[key] = pad_batch(vals, pad_id, side)
        elif isinstance(vals[0], bool) or not isinstance(vals[0], (int, float)):
            out[key] = list(vals)
        else:
            out[key] = torch.tensor(vals, dtype=torch.long if isinstance(vals[0], int) else torch.float32)
    return out


def input_device(model: nn.Module) -> torch.device:
    """Where the model reads its inputs (the input embeddings' device; offloaded weights live on ``meta``)."""
    try:
        hf: Any = model  # a PreTrainedModel (typed as nn.Module here)
        emb = hf.get_input_embeddings()
        dev = emb.weight.device
        if dev.type != "meta":
            return dev
    except (AttributeError, NotImplementedError):
        pass
    hook = getattr(model, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_inputs(model: nn.Module, batch: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The forward's keyword arguments from a collated batch, on the model's input device.

    Adds ``position_ids`` counting real tokens only (as ``generate`` does) when the model takes them, so a
    left-padded row computes what it computes alone; ``extra`` (e.g. ``logits_to_keep=1``) is passed on when
    the model's forward accepts it.
    """
    dev = input_device(model)
    out = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "attention_mask" in out and "position_ids" not in out and _accepts(model, "position_ids"):
        out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    out.update({k: v for k, v in extra.items() if _accepts(model, k)})
    return out
