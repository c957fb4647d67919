"""What the probes accept as arrays: torch tensors or numpy arrays."""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def to_tensor(a: ArrayLike) -> torch.Tensor:
    """``a`` as a detached tensor (numpy arrays are wrapped, not copied where possible)."""
    return a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
