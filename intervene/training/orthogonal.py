"""``Orthonormal``: an ``[n, k]`` matrix whose columns stay orthonormal while it is trained.

DAS's rotation (``k = n``) and LoReFT's projection (``k = r``) are kept on the manifold by PyTorch's
orthogonal parametrization (``torch.nn.utils.parametrizations.orthogonal``: the matrix exponential for
square matrices, Householder products otherwise, with the default trivialization ``Q = base · φ(X)``), as
pyvene and pyreft do. Two things are our own:

* the state is **set directly** (``base`` = the matrix completed to an orthonormal ``n × n`` basis, ``X`` the
  parameter at which ``φ`` is exactly the identity), never through the parametrization's
  ``right_inverse``, which re-orthogonalises by QR (changing the bits of a loaded matrix) and draws the
  completion from the global RNG. So a set matrix reads back bit for bit;
* outside training (``module.eval()``) the matrix is computed once and cached, so inference pays no
  matrix exponential and a saved matrix reloads to the identical tensor. Training mode recomputes it on
  every call, with gradients.

Parameters are float32 (the parametrization rejects bf16); interventions cast activations up to it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrizations

from intervene.errors import InterventionError


def random_orthonormal(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A seeded random ``[n, k]`` float32 matrix with orthonormal columns (``nn.init.orthogonal_``)."""
    q = torch.empty(k, n)  # orthogonal_ makes the rows of a wide matrix orthonormal
    nn.init.orthogonal_(q, generator=generator)
    return q.T.contiguous()


def _complete(q: torch.Tensor) -> torch.Tensor:
    """``[n, n]``: ``q`` ``[n, k]`` itself (bit for bit) followed by an orthonormal basis of its complement."""
    n, k = q.shape
    if k == n:
        return q.clone()
    rest = torch.linalg.qr(q.double(), mode="complete").Q[:, k:]  # deterministic, no RNG
    return torch.cat([q, rest.to(q.dtype)], dim=1)


class Orthonormal(nn.Module):
    """``[n, k]`` (``k <= n``) with orthonormal columns; call the module to get the matrix.

    Args:
        n, k: the shape (``k`` defaults to ``n``: a rotation).
        init: the starting matrix (columns orthonormal); a seeded random one otherwise.
        generator: seeds the random start.
    """

    def __init__(self, n: int, k: int | None = None, init: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        k = n if k is None else k
        if not 0 < k <= n:
            raise InterventionError(f"an orthonormal [n, k] matrix needs 0 < k <= n, got n={n}, k={k}")
        self.n, self.k = int(n), int(k)
        holder = nn.Module()
        holder.weight = nn.Parameter(torch.eye(self.n, self.k))
        with torch.random.fork_rng(devices=[]):  # registering calls right_inverse, which may draw from the RNG
            parametrizations.orthogonal(holder, "weight")
        self.holder: Any = holder  # its weight is reached through torch's parametrization (dynamic attributes)
        self._cache: torch.Tensor | None = None
        self.set_(init if init is not None else random_orthonormal(self.n, self.k, generator))

    @torch.no_grad()
    def set_(self, q: torch.Tensor) -> None:
        """Make the matrix exactly ``q`` (``[n, k]``): ``base`` = ``q`` completed, the parameter at ``φ = I``."""
        if tuple(q.shape) != (self.n, self.k):
            raise InterventionError(f"expected an [{self.n}, {self.k}] matrix, got {tuple(q.shape)}")
        p: Any = self.holder.parametrizations.weight
        dev = p.original.device
        q = q.detach().to(device=dev, dtype=torch.float32)
        p.original.copy_(-torch.eye(self.n, self.k, device=dev))  # φ(−I) = I for both maps (see module doc)
        p[0].base = _complete(q)
        self._cache = None

    def forward(self) -> torch.Tensor:
        """The ``[n, k]`` float32 matrix (differentiable in train mode, a cached constant in eval mode)."""
        if self.training:
            return self.holder.weight
        if self._cache is None:
            with torch.no_grad():
                self._cache = self.holder.weight.detach()
        return self._cache

    def invalidate(self) -> None:
        """Forget the cached matrix (after an optimizer step or a state load)."""
        self._cache = None

    def train(self, mode: bool = True) -> Orthonormal:
        self._cache = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - torch's signature
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"n={self.n}, k={self.k}"
