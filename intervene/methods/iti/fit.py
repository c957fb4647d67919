"""ITI's data and selection: labelled prompt+answer texts, head activations, head ranking, directions, σ.

The per-head probes themselves are fitted by :func:`intervene.probes.solvers.fit_head_probes`, from the
solver family the probes share (docs/architecture.md, "The logistic-regression solvers"). Shapes: ``L`` layers, ``H`` heads, ``N`` examples, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

# ---------------------------------------------------------------------------------------------
# Data: prompts with answers, labelled true/false, grouped by question
# ---------------------------------------------------------------------------------------------

TQA_TEMPLATE = "Q: {question} A: {answer}"  # honest_llama's format_truthfulqa (one space, no newline)
DirectionKind = Literal["mass_mean", "probe", "random"]


@dataclass
class ITIExamples:
    """Texts whose last token is probed, their truth labels and the question each belongs to."""

    texts: list[str]
    labels: torch.Tensor  # [N] int64 in {0, 1}
    groups: list[str]  # [N] question ids: a question's answers never straddle train/validation


def build_examples(data: Sequence[Any], template: str = TQA_TEMPLATE) -> ITIExamples:
    """Render ``data`` into labelled texts. Accepted rows:

    * TruthfulQA ``multiple_choice``: ``question`` + ``mc2_targets`` (else ``mc1_targets``)
      ``{choices, labels}``: one text ``template.format(question, answer)`` per choice;
    * TruthfulQA ``generation``: ``question`` + ``correct_answers`` / ``incorrect_answers``;
    * quirky rows (``text`` ending before the answer, ``choices``, ``label`` = the truth): one text
      per choice, ``text + choice``, labelled by whether that answer is true; grouped by ``question_id``;
    * plain rows ``{"text", "label"}`` (optional ``question_id`` / ``group``) or ``(text, label)`` pairs.
    """
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    for i, row in enumerate(data):
        if isinstance(row, (tuple, list)) and len(row) == 2:
            row = {"text": row[0], "label": row[1]}
        if not isinstance(row, Mapping):
            raise TypeError(f"row {i}: expected a mapping or a (text, label) pair, got {type(row).__name__}")
        if "question" in row and ("mc2_targets" in row or "mc1_targets" in row):
            tg = row.get("mc2_targets") or row["mc1_targets"]
            pairs = zip(tg["choices"], tg["labels"])
            items = [(template.format(question=row["question"], answer=a), int(lab)) for a, lab in pairs]
            group = str(row["question"])
        elif "question" in row and "correct_answers" in row:
            items = [(template.format(question=row["question"], answer=a), lab)
                     for lab, key in ((1, "correct_answers"), (0, "incorrect_answers")) for a in row.get(key, [])]
            group = str(row["question"])
        elif "choices" in row and "text" in row and "label" in row:
            items = [(row["text"] + c, int(j == int(row["label"]))) for j, c in enumerate(row["choices"])]
            group = str(row.get("question_id", row.get("statement", i)))
        elif "text" in row and "label" in row:
            items = [(str(row["text"]), int(row["label"]))]
            group = str(row.get("question_id", row.get("group", f"row-{i}")))
        else:
            raise ValueError(f"row {i} has none of the accepted formats (keys: {sorted(row)[:8]}); see build_examples")
        for text, lab in items:
            if lab not in (0, 1):
                raise ValueError(f"row {i}: labels must be 0/1, got {lab!r}")
            texts.append(text)
            labels.append(lab)
            groups.append(group)
    if not texts:
        raise ValueError("no examples: the data is empty")
    return ITIExamples(texts, torch.tensor(labels, dtype=torch.int64), groups)


def split_by_group(groups: Sequence[str], val_fraction: float = 0.2, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, val)`` with whole groups on one side; ``round(val_fraction·G)`` groups (>= 1) in val.

    Groups are ordered by first appearance, then shuffled with a seeded generator, so the split is
    deterministic for given data and ``seed``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(dict.fromkeys(groups))
    if len(order) < 2:
        raise ValueError("ITI needs at least two questions (groups) to split train/validation by question")
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order))))
    val_groups = {order[j] for j in perm[:n_val]}
    is_val = torch.tensor([g in val_groups for g in groups])
    return (~is_val).nonzero().squeeze(-1), is_val.nonzero().squeeze(-1)


def as_head_tensor(activations: Any, n: int | None = None) -> torch.Tensor:
    """Head activations as ``[L, H, N, D]`` float32 from ``{"layers.{i}.heads": [N, H, D]}`` (e.g. what
    :func:`intervene.collect` returns) or a tensor ``[N, L, H, D]`` (honest_llama's layout)."""
    if isinstance(activations, Mapping):
        names = sorted((k for k in activations if k.startswith("layers.") and k.endswith(".heads")),
                       key=lambda k: int(k.split(".")[1]))
        if not names:
            raise ValueError("the activations hold no 'layers.{i}.heads' sites")
        x = torch.stack([torch.as_tensor(activations[k]) for k in names]).transpose(1, 2)
    else:
        x = torch.as_tensor(activations)
        if x.ndim != 4:
            raise ValueError(f"head activations must be [N, L, H, D], got {tuple(x.shape)}")
        x = x.permute(1, 2, 0, 3)
    if n is not None and x.shape[2] != n:
        raise ValueError(f"the activations hold {x.shape[2]} examples, the data renders {n}")
    return x.to(torch.float32).contiguous()


def head_activations(model: Any, tok: Any, texts: Sequence[str], batch_size: int = 16,
                     progress: bool = False) -> torch.Tensor:
    """Last-token activations of every head (the o_proj input), ``[L, H, N, D]`` float32."""
    from intervene.activations import collect

    acts = collect(model, tok, list(texts), sites="layers.*.heads", positions="last", batch_size=batch_size,
                   progress=progress)
    return as_head_tensor({s: acts[s] for s in acts.sites})


# ---------------------------------------------------------------------------------------------
# Selection: rank heads, directions and σ
# ---------------------------------------------------------------------------------------------


def rank_heads(accuracy: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` ``(layer, head)`` pairs of highest accuracy (``[L, H]``), best first; ties keep layer order."""
    n_layers, n_heads = accuracy.shape
    if not 0 < k <= n_layers * n_heads:
        raise ValueError(f"num_heads must be between 1 and {n_layers * n_heads}, got {k}")
    order = torch.sort(-accuracy.reshape(-1).double(), stable=True).indices[:k].tolist()
    return [(i // n_heads, i % n_heads) for i in order]


def head_directions(x: torch.Tensor, y: torch.Tensor, heads: Sequence[tuple[int, int]],
                    kind: DirectionKind = "mass_mean", probe_coef: torch.Tensor | None = None,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions ``[K, D]`` and σ ``[K]`` for the selected heads.

    Args:
        x: head activations ``[L, H, N, D]`` of the rows the directions are fitted on.
        y: labels ``[N]`` (1 = true).
        kind: ``"mass_mean"`` (mean(true) - mean(false)), ``"probe"`` (the probe's weight vector,
            ``probe_coef`` ``[L, H, D]``) or ``"random"`` (a seeded Gaussian direction, a control).

    σ is the standard deviation with ddof=0 (``np.std``, as honest_llama) of ``x`` projected on the
    unit direction, over the same rows.
    """
    idx_l = torch.tensor([h[0] for h in heads])
    idx_h = torch.tensor([h[1] for h in heads])
    xs = x[idx_l, idx_h].double()  # [K, N, D]
    yb = torch.as_tensor(y).bool()
    if kind == "mass_mean":
        if yb.all() or not yb.any():
            raise ValueError("the mass-mean direction needs both true and false examples")
        d = xs[:, yb].mean(1) - xs[:, ~yb].mean(1)
    elif kind == "probe":
        if probe_coef is None:
            raise ValueError("direction='probe' needs the probes' coefficients")
        d = probe_coef[idx_l, idx_h].double()
    elif kind == "random":
        g = torch.Generator().manual_seed(seed)
        d = torch.randn(len(heads), x.shape[-1], generator=g, dtype=torch.float64)
    else:
        raise ValueError(f"unknown direction {kind!r}; use 'mass_mean', 'probe' or 'random'")
    norm = d.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()) or not bool(torch.isfinite(norm).all()):
        raise ValueError("a selected head has a zero or non-finite direction")
    unit = d / norm
    proj = torch.einsum("knd,kd->kn", xs, unit)
    sigma = proj.std(-1, correction=0)
    return unit.float(), sigma.float()
