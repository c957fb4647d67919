"""Hyperparameters of causal tracing and patching sweeps: the defaults of the functions and the CLI options."""

from __future__ import annotations

from dataclasses import dataclass

from intervene.hparams import hparam


@dataclass(frozen=True)
class TraceConfig:
    """Causal tracing as in ROME (Meng et al., 2022)."""

    samples: int = hparam(10, "noise draws per prompt (the paper's 10); every restored state reuses the same draws")
    noise_multiplier: float = hparam(3.0, "noise std as a multiple of the subject tokens' embedding std (the paper's 3)")
    window: int = hparam(10, "layers of MLP / attention restored together around each layer (the paper's 10; "
                             "use 1-2 on a model with few layers)")
    kinds: tuple[str, ...] = hparam(("hidden", "mlp", "attn"), "which states to restore: block outputs, MLP or "
                                                                "attention outputs", choices=("hidden", "mlp", "attn"))
    seed: int = hparam(1, "seeds the noise draws")

    def __post_init__(self) -> None:
        if self.samples < 1 or self.window < 1 or self.noise_multiplier < 0:
            raise ValueError("samples and window must be >= 1 and noise_multiplier >= 0")


@dataclass(frozen=True)
class SweepConfig:
    """An activation-patching sweep over (site, position) cells."""

    sites: tuple[str, ...] = hparam(("layers.*",), "sites or wildcards to sweep (layers.*, layers.*.attn, "
                                                   "layers.*.mlp, layers.*.heads)")
    positions: str = hparam("each", "'each' token, 'all' at once, or comma-separated indices from the end "
                                    "(e.g. -3,-2,-1)")
    direction: str = hparam("denoise", "denoise: clean activations into the corrupted run; noise: the reverse",
                            choices=("denoise", "noise"))
    heads: str = hparam("each", "heads sites: sweep each head, or the whole site", choices=("each", "site"))
    batch_size: int = hparam(64, "rows (cell x pair) per forward")

    def position_spec(self) -> str | list[int]:
        """``positions`` as :func:`~intervene.methods.patching.sweeps.sweep` takes it."""
        if self.positions in ("each", "all"):
            return self.positions
        try:
            return [int(p) for p in self.positions.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"positions must be 'each', 'all' or comma-separated integers, got {self.positions!r}") from None
