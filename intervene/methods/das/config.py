"""DAS's hyperparameters: the subspace, Boundless DAS's mask, and the shared training loop's fields
(:class:`~intervene.training.TrainConfig`, with DAS's own defaults). ``intervene das fit`` takes its options
from here, and a fitted DAS records it in the diff."""

from __future__ import annotations

from dataclasses import dataclass

from intervene.hparams import hparam
from intervene.training import TrainConfig


@dataclass(frozen=True)
class DASConfig(TrainConfig):
    """DAS / Boundless DAS trained with the interchange-intervention loss (Geiger et al. 2023; Wu et al. 2023)."""

    lr: float = hparam(1e-2, "AdamW learning rate of the rotation (pyvene's IOI tutorial: 1e-2)")
    epochs: int = hparam(5, "passes over the training pairs at most")
    batch_size: int = hparam(32, "pairs per forward pass")
    k: int = hparam(1, "rotated dimensions interchanged (DAS; Boundless DAS learns it)")
    boundless: bool = hparam(False, "learn a soft mask over the rotated dimensions instead of a fixed k")
    boundary_init: float = hparam(0.5, "Boundless: the mask's starting edge, as a fraction of the width")
    boundary_lr_scale: float = hparam(10.0, "Boundless: the boundary's learning rate over the rotation's")
    boundary_penalty: float = hparam(1.0, "Boundless: weight of the boundary (fraction of the width) in the loss")
    temperature_start: float = hparam(50.0, "Boundless: mask temperature at the first step")
    temperature_end: float = hparam(0.1, "Boundless: mask temperature at the last step")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if not 0.0 <= self.boundary_init <= 1.0:
            raise ValueError(f"boundary_init is a fraction of the width in [0, 1], got {self.boundary_init}")
        if self.temperature_start <= 0 or self.temperature_end <= 0:
            raise ValueError("temperatures must be positive")
