"""REMEDI's hyperparameters: the defaults of ``Remedi.fit``, the ``intervene remedi fit`` options, and the
``config`` saved with a fitted editor (so a fit is reproducible from its diff)."""

from __future__ import annotations

from dataclasses import dataclass

from intervene.hparams import hparam


@dataclass(frozen=True)
class RemediConfig:
    """The editor's shape, the editing loss and the training loop (Hernandez, Li & Andreas, 2023)."""

    side: str = hparam("output", "edit the block's output, or its input (at layer 0: the embeddings)",
                       choices=("output", "input"))
    rank: int | None = hparam(None, "rank of the editor's map W (None: full hidden×hidden)")
    alpha: float = hparam(1.0, "edit strength: h ← h + α·d (may be changed after fitting)")
    use_entity: bool = hparam(False, "feed the entity's own representation to the editor as well")
    lam_m: float = hparam(1.0, "weight of −log p̃(target_new), the edit's efficacy term")
    lam_u: float = hparam(1.0, "weight of −log(1 − p̃(target_true)), unlearning the old attribute")
    lam_kl: float = hparam(10.0, "weight of the KL to the unedited model between the entity and the answer")
    norm_penalty: float = hparam(0.0, "weight of ‖d‖₂, the size of the edit direction")
    lr: float = hparam(1e-3, "AdamW learning rate")
    weight_decay: float = hparam(0.01, "AdamW weight decay")
    epochs: int = hparam(20, "training epochs at most (early stopping on the validation loss)")
    batch_size: int = hparam(16, "training examples per step")
    val_fraction: float = hparam(0.1, "fraction of samples held out for early stopping")
    patience: int = hparam(2, "epochs without a lower validation loss before stopping")
    seed: int = hparam(0, "seeds the editor's initialisation, the split and the shuffling")
    full_sequence_targets: bool = hparam(False, "score whole targets (teacher forced), not their first token")

    def __post_init__(self) -> None:
        if self.side not in ("output", "input"):
            raise ValueError(f"side must be 'output' or 'input', got {self.side!r}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be a positive integer or None, got {self.rank}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
