"""What a bake records: one affine edit (``Op``), the report of a bake, and a residual writer's weights.

Kept apart from :mod:`intervene.bake.editor`, which collects these and folds them into a copy of the model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from intervene.bake.layout import Part
from intervene.errors import NotBakeableError
from intervene.sites.probe import weight_of

op_order = itertools.count()


@dataclass(frozen=True)
class Op:
    r: torch.Tensor | None  # unit direction: project with I - r rᵀ first
    c: torch.Tensor | None  # then add this constant
    order: int
    why: str
    seq: int = field(default_factory=lambda: next(op_order))
    lr: tuple[torch.Tensor, torch.Tensor] | None = None  # (L, R): project with I - L R first (instead of r)


# {module path: ((layer, part), input edits, output edits)}
Units = dict[str, tuple[tuple[int, Part], list[Op], list[Op]]]
# (units, constants moved in from a parallel partner, writers whose constant moved out, {config flag: why})
Plan = tuple[Units, dict[str, torch.Tensor], set[str], dict[str, str]]


@dataclass
class BakeReport:
    """What a bake changed: parameter names, created biases, config flags, untied embeddings."""

    edited: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    config_flags: dict[str, Any] = field(default_factory=dict)
    untied_embeddings: bool = False
    interventions: list[dict[str, Any]] = field(default_factory=list)


class Writer:
    """A residual writer's weight viewed as ``[..., out, in]`` (Linear, GPT-2 Conv1D, MoE experts)."""

    def __init__(self, model: nn.Module, path: str, hidden: int) -> None:
        self.path = path
        mod = model.get_submodule(path)
        self.module = mod
        experts = getattr(mod, "experts", None)
        weight = weight_of(mod)
        if isinstance(mod, nn.Linear):
            self.kind, self.param = "linear", mod.weight
        elif type(mod).__name__ == "Conv1D" and weight is not None and weight.ndim == 2:
            self.kind, self.param = "conv1d", weight  # stored [in, out]
        elif experts is not None and isinstance(getattr(experts, "down_proj", None), torch.Tensor) \
                and experts.down_proj.ndim == 3 and experts.down_proj.shape[-2] == hidden \
                and not any(hasattr(mod, a) for a in ("shared_expert", "shared_experts")):
            self.kind, self.param = "experts", experts.down_proj  # [experts, out, in]
        elif "norm" in type(mod).__name__.lower() or all(p.ndim <= 1 for p in mod.parameters()):
            raise NotBakeableError(f"{path} ({type(mod).__name__}) normalises the branch output before the residual "
                                   "add (a post-norm), so no bias or projection of a weight reproduces an edit of "
                                   "what it writes")
        else:
            raise NotBakeableError(f"{path} ({type(mod).__name__}) is not a Linear, Conv1D or plain MoE "
                                   "experts block, so edits of what it writes cannot be folded into it")

    @property
    def weight_name(self) -> str:
        return f"{self.path}.experts.down_proj" if self.kind == "experts" else f"{self.path}.weight"

    @property
    def can_hold_bias(self) -> bool:
        return self.kind != "experts"

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None) if self.kind != "experts" else None

    def weight64(self) -> torch.Tensor:
        w = self.param.detach().to(torch.float64)
        return w.t() if self.kind == "conv1d" else w

    def stored(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.kind == "conv1d" else w
