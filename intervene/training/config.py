"""The shared training loop's hyperparameters (:class:`TrainConfig`).

A trainable method's config subclasses it (``class DASConfig(TrainConfig)``), redeclaring a field to give
that method its own default, so one dataclass still drives its CLI options
(:func:`intervene.command.add_config_arguments`) and the ``config`` saved with a fitted intervention;
:func:`train_config` picks the loop's fields back out of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from intervene.hparams import hparam

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """AdamW on the intervention's parameters, the model frozen; early stopping on a validation split."""

    lr: float = hparam(1e-3, "AdamW learning rate (peak, after warm-up)")
    weight_decay: float = hparam(0.0, "AdamW weight decay")
    epochs: int = hparam(10, "passes over the training data at most")
    max_steps: int | None = hparam(None, "stop after this many optimizer steps (None: epochs decide)")
    batch_size: int = hparam(16, "examples per forward pass")
    grad_accum: int = hparam(1, "forward passes per optimizer step (effective batch = batch_size × grad_accum)")
    schedule: str = hparam("constant", "learning-rate schedule after warm-up", choices=SCHEDULES)
    warmup: float = hparam(0.0, "fraction of the optimizer steps spent warming the learning rate up from 0")
    max_grad_norm: float | None = hparam(None, "clip the gradient's global L2 norm to this (None: no clipping)")
    val_fraction: float = hparam(0.1, "fraction of the training data held out for early stopping (when no "
                                      "validation set is given)")
    patience: int | None = hparam(2, "evaluations without a lower validation loss before stopping (None: never)")
    eval_every: int = hparam(0, "optimizer steps between validations (0: once per epoch)")
    eval_at_start: bool = hparam(True, "evaluate the untrained intervention too (it can be the best)")
    restore_best: bool = hparam(True, "end with the parameters of the best evaluation, not the last step")
    seed: int = hparam(0, "seeds the validation split and the shuffling")

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("epochs must be >= 0, batch_size and grad_accum >= 1")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 or None, got {self.max_steps}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")


def train_config(cfg: Any) -> TrainConfig:
    """The :class:`TrainConfig` part of a method's config (any dataclass holding the same field names)."""
    if isinstance(cfg, TrainConfig) and type(cfg) is TrainConfig:
        return cfg
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return TrainConfig(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)})
