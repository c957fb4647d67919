"""Next-token choice scoring: which of a row's answer strings the model prefers after its prompt.

The quirky datasets (:mod:`intervene.data.quirky`) give each row a ``text`` ending before the answer and
single-token ``choices``; ``choice_logits(...).argmax(-1)`` is the model's answer in their label convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def choice_token_ids(tokenizer: PreTrainedTokenizerBase, choices: Sequence[str]) -> list[int]:
    """The first token of each answer string (the demo's answers are single tokens)."""
    return [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]


@torch.no_grad()
def choice_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict],
                  batch_size: int = 128) -> torch.Tensor:
    """Next-token logits of each row's ``choices`` after its ``text``: a float tensor ``[n_rows, n_choices]``.

    Prompts are batched with left padding, so the last position is every row's next-token position.
    ``argmax(-1)`` is the model's answer in the label convention of the quirky datasets.
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    ids_of: dict[tuple[str, ...], list[int]] = {}  # rows share a few choice lists: tokenize each once
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = tokenizer([r["text"] for r in chunk], return_tensors="pt", padding=True).to(device)
            logits = model(**batch).logits[:, -1].float()
            keys = [tuple(r["choices"]) for r in chunk]
            for key in keys:
                if key not in ids_of:
                    ids_of[key] = choice_token_ids(tokenizer, key)
            ids = torch.tensor([ids_of[key] for key in keys], device=device)
            out.append(logits.gather(1, ids).cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(out) if out else torch.empty(0, 2)
