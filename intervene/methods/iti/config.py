"""ITI's hyperparameters: the defaults of ``ITI.fit``, the ``intervene iti`` options and what a fit records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from intervene.hparams import hparam

DIRECTIONS = ("mass_mean", "probe", "random")


@dataclass(frozen=True)
class ITIConfig:
    """How :meth:`~intervene.methods.iti.ITI.fit` selects heads and shifts them (Li et al., 2023)."""

    num_heads: int = hparam(48, "K: how many heads to shift, the best K by validation accuracy of their probes")
    alpha: float = hparam(15.0, "strength α: each selected head moves α·σ along its unit direction")
    direction: str = hparam("mass_mean", "each head's direction: mean(true) − mean(false), the probe's weight "
                                         "vector, or a seeded random direction (a control)", choices=DIRECTIONS)
    positions: Any = hparam("all", "which tokens get the shift (any positions spec in Python; 'all' bakes)",
                            choices=("all", "generated", "last"))
    val_fraction: float = hparam(0.2, "fraction of questions held out to rank the heads")
    C: float = hparam(1.0, "inverse L2 strength of the per-head probes (scikit-learn's C; the paper's 1.0)")
    seed: int = hparam(0, "seeds the question split and the random-direction control")

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; use one of {DIRECTIONS}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.C <= 0:
            raise ValueError(f"C must be > 0, got {self.C}")
