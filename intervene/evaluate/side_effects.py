"""Side effects of an intervention on unrelated text: cross-entropy and KL against the base model.

As in the ITI paper: next-token cross-entropy on a reference corpus with and without the edit, and
``KL(p_base || p_edited)`` of the next-token distributions, both averaged over every predicted
token (each text's first token has no prediction). The base model is the same model with the
hooks disabled, so the comparison is exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from intervene.intervenable import Intervenable
from intervene.intervention import Intervention
from intervene.positions import Positions, PositionsSpec


def default_reference_path() -> Path:
    """The demo model's held-out neutral text (one text per line)."""
    from intervene.assets import DEMO_MODEL_DIR

    return DEMO_MODEL_DIR / "neutral_eval.txt"


def load_reference_texts(path: str | Path | None = None, n: int | None = None) -> list[str]:
    """Non-empty lines of ``path`` (default :func:`default_reference_path`), the first ``n`` if given."""
    p = Path(path) if path is not None else default_reference_path()
    if not p.is_file():
        raise FileNotFoundError(f"no reference text file at {p}")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:n] if n is not None else lines


@contextlib.contextmanager
def _positions_overridden(ivm: Intervenable, positions: PositionsSpec | None) -> Iterator[None]:
    """Temporarily apply every intervention at ``positions`` (e.g. ``"all"``), then restore."""
    if positions is None:
        yield
        return
    pos = Positions.parse(positions)
    saved = [iv.positions for iv in ivm.interventions]
    try:
        for iv in ivm.interventions:
            iv.positions = pos
        yield
    finally:
        for iv, p in zip(ivm.interventions, saved):
            iv.positions = p


def _batches(tok: Any, texts: Sequence[str], batch_size: int, max_length: int | None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = [list(tok(t)["input_ids"]) for t in texts]
    if max_length is not None:
        ids = [x[:max_length] for x in ids]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        inp = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(inp)
        for r, x in enumerate(chunk):  # right padding: real tokens keep their unpadded positions
            inp[r, :len(x)] = torch.tensor(x)
            mask[r, :len(x)] = 1
        yield inp, mask


@torch.no_grad()
def side_effects(model: Any, tok: Any, texts: Sequence[str],
                 edits: Intervenable | Intervention | Sequence[Intervention], batch_size: int = 16,
                 max_length: int | None = 256, positions: PositionsSpec | None = "all") -> dict[str, float]:
    """Cross-entropy of the base and the edited model on ``texts`` and the KL between them.

    Args:
        model: the base ``PreTrainedModel`` (ignored when ``edits`` is an ``Intervenable``).
        edits: an ``Intervenable`` or the interventions to attach for the measurement.
        positions: apply every intervention at these positions while measuring (default ``"all"``,
            as the ITI paper does); ``None`` keeps each intervention's own positions.

    Returns:
        ``{"ce_base", "ce", "ce_delta", "kl", "n_tokens", "ce_delta_se", "kl_se"}`` in nats per predicted token;
        the two ``_se`` are standard errors over the texts (of a ratio of sums: each text weighs by its tokens),
        the noise a figure measured on these texts carries.
    """
    own = not isinstance(edits, Intervenable)
    ivm = Intervenable(model, edits, attach=False) if own else edits
    device = next(ivm.model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64)  # ce_base, ce, kl (sums over tokens)
    n_tok = 0
    per_text: list[torch.Tensor] = []  # [texts, 3]: CE change, KL, tokens (sums over each text's tokens)
    was = ivm.attached
    try:
        ivm.attach()
        with _positions_overridden(ivm, positions):
            for inp, mask in _batches(tok, texts, batch_size, max_length):
                inp, mask = inp.to(device), mask.to(device)
                with ivm.disabled():
                    base = ivm(input_ids=inp, attention_mask=mask).logits[:, :-1].float()
                edit = ivm(input_ids=inp, attention_mask=mask).logits[:, :-1].float()
                tgt = inp[:, 1:]
                keep = mask[:, 1:].bool()
                lb = torch.log_softmax(base, -1)
                le = torch.log_softmax(edit, -1)
                ce_b = -lb.gather(-1, tgt[..., None]).squeeze(-1)
                ce_e = -le.gather(-1, tgt[..., None]).squeeze(-1)
                kl = (lb.exp() * (lb - le)).sum(-1)
                for j, v in enumerate((ce_b, ce_e, kl)):
                    totals[j] += v[keep].double().sum().cpu()
                n_tok += int(keep.sum())
                k = keep.double()
                per_text.append(torch.stack([((ce_e - ce_b).double() * k).sum(1), (kl.double() * k).sum(1),
                                             k.sum(1)], 1).cpu())
    finally:
        if not was:
            ivm.detach()
    if n_tok == 0:
        raise ValueError("the reference texts have no predicted tokens (each needs at least two tokens)")
    ce_base, ce, kl = (totals / n_tok).tolist()
    rows = torch.cat(per_text)
    return {"ce_base": ce_base, "ce": ce, "ce_delta": ce - ce_base, "kl": kl, "n_tokens": n_tok,
            "ce_delta_se": _ratio_se(rows[:, 0], rows[:, 2]), "kl_se": _ratio_se(rows[:, 1], rows[:, 2])}


def _ratio_se(sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Standard error of ``sums.sum() / counts.sum()`` over the texts (the ratio estimator's linearisation)."""
    m = int(sums.numel())
    if m < 2:
        return float("nan")
    r = sums.sum() / counts.sum()
    return float(((sums - r * counts) ** 2).sum().div(m * (m - 1)).sqrt() / counts.mean())
