"""Schemas of every on-disk format intervene reads, as strict pydantic models (docs/architecture.md,
"Validating files").

One module per family of formats: :mod:`~intervene.schemas.diff` (the diff's config),
:mod:`~intervene.schemas.probe`, :mod:`~intervene.schemas.sae` (SAELens and sparsify ``cfg.json``),
:mod:`~intervene.schemas.caches` (activation cache, latent cache, delphi), :mod:`~intervene.schemas.interop`
(pyvene) and :mod:`~intervene.schemas.tensors` (safetensors headers). Method parameters are validated
by each method's own ``from_saved`` with the same base (:mod:`~intervene.schemas.base`).
"""

from intervene.schemas.base import Strict, validate

__all__ = ["Strict", "validate"]
