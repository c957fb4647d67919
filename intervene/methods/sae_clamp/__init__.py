"""Exact clamps of SAE latents (:class:`LatentClamp`) and steering along a latent's decoder row.

The SAEs themselves (loading SAELens / sparsify files, encoding, latent caches, explaining and
scoring latents) live in :mod:`intervene.features`; this package holds only the intervention.
"""

from intervene.methods.sae_clamp.intervention import LatentClamp, steering_from_sae
from intervene.registry import register_method

register_method(
    "sae_clamp", LatentClamp,
    refuse="a clamp sets a latent to a value computed from each activation (encode, then decode the change), "
           "which no fixed weight edit reproduces; keep it as a diff or use steering_from_sae for a bakeable shift")

__all__ = ["LatentClamp", "steering_from_sae"]
