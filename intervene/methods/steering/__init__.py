"""Steering vectors and directional ablation (Turner et al. 2023; Arditi et al. 2024).

* :class:`Steering` adds ``scale * v`` at its sites (``from_probe``, ``from_sae`` build one);
* :class:`DirectionalAblation` removes the component along a unit direction (optionally clamping it);
* :func:`activation_norm`, :func:`scale_sweep`, :func:`choose_scale` help choose a scale
  (:mod:`intervene.methods.steering.scale`).

Both bake exactly at ``positions="all"`` (:mod:`intervene.methods.steering.bake`).
"""

from intervene.methods.steering.bake import bake_directional_ablation, bake_steering
from intervene.methods.steering.intervention import DirectionalAblation, Steering
from intervene.methods.steering.scale import activation_norm, choose_scale, scale_sweep
from intervene.registry import register_method

register_method("steering", Steering, bake=bake_steering)
register_method("directional_ablation", DirectionalAblation, bake=bake_directional_ablation)

__all__ = ["DirectionalAblation", "Steering", "activation_norm", "choose_scale", "scale_sweep"]
