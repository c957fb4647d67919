"""Token spans and hidden states for REMEDI: find an entity's or attribute's tokens by character offsets,
left-pad token lists, and read the mean activation of a site over given tokens (base model, no cache).

Shared by the editor (:mod:`intervene.methods.remedi.intervention`), its training loop, evaluation and
inspection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from intervene.errors import InterventionError
from intervene.hooks import HookSet, add_input_hook, add_output_hook
from intervene.sites import Site, hidden_size, resolve_site

if TYPE_CHECKING:
    from intervene.intervenable import Intervenable


def find_token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character offsets overlap ``[start, end)`` (special tokens never do)."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def tokenize_with_span(tok: Any, text: str, sub: str, what: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (with special tokens) and the token indices of the last occurrence of ``sub``.

    Raises ``InterventionError`` when ``sub`` is not in ``text`` or the tokenizer gives no offsets.
    """
    start = text.rfind(sub) if sub else -1
    if start < 0:
        raise InterventionError(f"REMEDI: the {what} {sub!r} does not occur in {text!r}")
    if not getattr(tok, "is_fast", False):
        raise InterventionError(
            f"REMEDI needs a fast tokenizer (character offsets) to find the {what}'s tokens; "
            f"{type(tok).__name__} has none. Load it with AutoTokenizer.from_pretrained(..., use_fast=True).")
    try:
        enc = tok(text, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise InterventionError(f"REMEDI needs character offsets from the tokenizer: {e}") from None
    span = find_token_span(enc["offset_mapping"], start, start + len(sub))
    if not span:
        raise InterventionError(f"REMEDI: no token of {text!r} covers the {what} {sub!r}")
    return list(enc["input_ids"]), span


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` ``[n, T]`` and ``attention_mask`` ``[n, T]`` (long) for token lists."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def pad_id_of(tok: Any) -> int:
    """A pad id to fill with (any id works: padding is masked); never changes the tokenizer."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, name, None)
        if isinstance(v, int):
            return v
    return 0


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def base_model_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """Disable an attached ``Intervenable``'s edits (found through its patched ``generate``) for base passes."""
    ivm = getattr(model.__dict__.get("generate"), "__intervene__", None)
    return ivm.disabled() if ivm is not None else contextlib.nullcontext()


def unwrap(model_or_ivm: nn.Module | Intervenable) -> nn.Module:
    """The underlying model of an ``Intervenable``, or the model itself."""
    return model_or_ivm if isinstance(model_or_ivm, nn.Module) else model_or_ivm.model


def site_name(site: int | str) -> str:
    """``layers.{L}`` for a layer number; a site name unchanged."""
    return f"layers.{site}" if isinstance(site, int) else site


@torch.no_grad()
def layer_means(model: nn.Module, site: int | str, seqs: Sequence[Sequence[int]], spans: Sequence[Sequence[int]],
                pad_id: int = 0, batch_size: int = 32) -> torch.Tensor:
    """Mean activation at ``site`` (a layer number: its block's output) over each sequence's token ``spans``
    (own-token indices): ``[n, hidden]`` float32.

    Runs the base model (an attached ``Intervenable`` is disabled meanwhile), without the KV cache.
    """
    resolved: Site = resolve_site(model, site_name(site))
    device = model_device(model)
    captured: list[torch.Tensor] = []

    def grab(h: torch.Tensor) -> torch.Tensor:
        captured.append(h)
        return h

    hooks = HookSet()
    out = []
    try:
        add = add_input_hook if resolved.side == "input" else add_output_hook
        add(hooks, resolved.module, grab, resolved.name)
        with base_model_context(model):
            for s in range(0, len(seqs), batch_size):
                chunk, chunk_spans = seqs[s:s + batch_size], spans[s:s + batch_size]
                ids, mask = left_pad(chunk, pad_id, device)
                captured.clear()
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                h = captured[-1].float()  # [b, T, hidden]
                width = ids.shape[1]
                for b, (seq, span) in enumerate(zip(chunk, chunk_spans)):
                    idx = torch.tensor([width - len(seq) + i for i in span], device=h.device)
                    out.append(h[b, idx].mean(0))
    finally:
        hooks.remove()
    return torch.stack(out) if out else torch.empty(0, hidden_size(model))


def attribute_states(model: nn.Module, tok: Any, site: int | str, contexts: Sequence[str], attributes: Sequence[str],
                     batch_size: int = 32) -> torch.Tensor:
    """``h_attr`` ``[n, hidden]`` (float32): mean activation at ``site`` over each attribute's tokens in its context."""
    if len(contexts) != len(attributes):
        raise InterventionError(f"{len(contexts)} contexts but {len(attributes)} attributes")
    toks = [tokenize_with_span(tok, c, a, "attribute") for c, a in zip(contexts, attributes)]
    return layer_means(unwrap(model), site, [t[0] for t in toks], [t[1] for t in toks], pad_id_of(tok), batch_size)


def entity_states(model: nn.Module, tok: Any, site: int | str, entities: Sequence[str], batch_size: int = 32
                  ) -> torch.Tensor:
    """``h_ent`` ``[n, hidden]`` (float32): activation at ``site`` at the entity's last token, entity run alone."""
    toks = [tokenize_with_span(tok, e, e, "entity") for e in entities]
    return layer_means(unwrap(model), site, [t[0] for t in toks], [t[1][-1:] for t in toks], pad_id_of(tok),
                       batch_size)


def prompt_entity_tokens(tok: Any, prompts: Sequence[str], entities: Sequence[str], required: bool = True
                         ) -> tuple[list[list[int]], list[tuple[int, ...]]]:
    """Token ids of each prompt and the index of its entity's last token (``()`` where absent and not required)."""
    if len(prompts) != len(entities):
        raise InterventionError(f"{len(prompts)} prompts but {len(entities)} entities")
    seqs, pos = [], []
    for p, e in zip(prompts, entities):
        if not required and (not e or e not in p):
            seqs.append(list(tok(p)["input_ids"]))
            pos.append(())
            continue
        ids, span = tokenize_with_span(tok, p, e, "entity")
        seqs.append(ids)
        pos.append((span[-1],))
    return seqs, pos
