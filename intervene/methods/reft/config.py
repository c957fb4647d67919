"""ReFT's hyperparameters: the intervention's shape and where it edits, and the shared training loop's fields
(:class:`~intervene.training.TrainConfig` with ReFT's defaults, after pyreft's README demo: rank 4, the last
prompt token, lr 4e-3). ``intervene reft fit`` takes its options from here; a fitted ReFT records it."""

from __future__ import annotations

from dataclasses import dataclass

from intervene.hparams import hparam
from intervene.training import TrainConfig

VARIANTS = ("loreft", "direft")


@dataclass(frozen=True)
class ReFTConfig(TrainConfig):
    """LoReFT / DiReFT trained with cross-entropy on each prompt's target (Wu et al. 2024)."""

    lr: float = hparam(4e-3, "AdamW learning rate (pyreft's README demo: 4e-3)")
    epochs: int = hparam(10, "passes over the training rows at most")
    batch_size: int = hparam(16, "rows per forward pass")
    rank: int = hparam(4, "r: the edited subspace's dimension")
    positions: str = hparam("last", "where it edits: the prompt's last token, every prompt token, or every token",
                            choices=("last", "prompt", "all"))
    variant: str = hparam("loreft", "LoReFT (orthonormal R) or DiReFT (no orthogonality, no subtraction)",
                          choices=VARIANTS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
