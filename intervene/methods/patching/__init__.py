"""Causal interventions: activation patching, interchange, patching sweeps, causal tracing, attribution patching.

* :class:`Patch` / :class:`Noise` — set activations to source values (zero, mean, resampled, another run's)
  or add seeded noise (``intervention.py``);
* :func:`interchange` — source run, then base run with the source's activations patched in (``exchange.py``);
* :func:`sweep` — the effect of patching every (site, position) cell, many cells per forward (``sweeps.py``),
  as a :class:`PatchingResult` grid with a heat map (``metrics.py``, ``plots.py``);
* :func:`attribution_patching` — every cell of a sweep estimated from two forwards and one backward;
* :func:`trace` / :func:`trace_dataset` — causal tracing (ROME): restore clean states into noised runs.
"""

from intervene.methods.patching import cli
from intervene.methods.patching.attribution import attribution_patching
from intervene.methods.patching.compare import agreement, spearman
from intervene.methods.patching.exchange import interchange, interchange_patch
from intervene.methods.patching.intervention import Noise, Patch
from intervene.methods.patching.metrics import PatchingResult, answer_prob, logit_diff
from intervene.methods.patching.sweeps import sweep
from intervene.methods.patching.tracing import DatasetTrace, TraceResult, noise_level, trace, trace_dataset
from intervene.registry import register_method

register_method(
    "patch", Patch, cli=cli.register,
    refuse="a patch replaces activations with given values instead of adding to them; weights can only add a "
           "constant (a bias) or project, so only steering-like edits bake")
register_method(
    "noise", Noise,
    refuse="noise is drawn per token and position at run time; weights are the same for every token")

__all__ = ["DatasetTrace", "agreement", "spearman", "Noise", "Patch", "PatchingResult", "TraceResult", "noise_level", "trace", "trace_dataset", "answer_prob", "attribution_patching", "interchange", "interchange_patch", "logit_diff",
           "sweep"]
