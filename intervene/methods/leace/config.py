"""ConceptErasure's hyperparameters: the defaults of ``ConceptErasure.fit``, the ``intervene erase fit``
options and what a fit records. The fitter's options are ``concept_erasure.LeaceFitter``'s, with its defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from intervene.hparams import hparam

METHODS = ("leace", "orth")
COLLECT = ("last", "all")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class ConceptErasureConfig:
    """How :func:`~intervene.methods.leace.fit.fit_erasers` fits one eraser per site."""

    method: str = hparam("leace", "LEACE (the least-squares oblique projection) or 'orth' (an orthogonal "
                                  "projection of the class-mean directions)", choices=METHODS)
    affine: bool = hparam(True, "erase around the training mean (x ↦ x - LR(x - μ)), so the mean is kept; "
                                "False erases x ↦ x - LRx")
    constrain_cov_trace: bool = hparam(True, "never let erasure raise the covariance's trace (mixes toward "
                                             "the orthogonal projection when it would)")
    shrinkage: bool = hparam(True, "estimate the covariance with optimal linear shrinkage")
    svd_tol: float = hparam(0.01, "drop singular values of the whitened cross-covariance below this")
    collect_positions: str = hparam("last", "which tokens' activations the eraser is fitted on: each text's "
                                            "last token, or all its tokens (each labelled as its text)",
                                    choices=COLLECT)
    positions: Any = hparam("all", "which tokens are erased (any positions spec in Python; 'all' bakes)",
                            choices=("all", "generated", "last", "prompt"))
    fit_dtype: str = hparam("float32", "dtype of the fit and of the stored eraser (float32: what LeaceFitter gives on collected activations)",
                        choices=DTYPES)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.collect_positions not in COLLECT:
            raise ValueError(f"collect_positions must be one of {COLLECT}, got {self.collect_positions!r}")
        if self.fit_dtype not in DTYPES:
            raise ValueError(f"fit_dtype must be one of {DTYPES}, got {self.fit_dtype!r}")
        if not self.svd_tol > 0:
            raise ValueError(f"svd_tol must be > 0, got {self.svd_tol}")
