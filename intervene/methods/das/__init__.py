"""Distributed alignment search (Geiger et al. 2023) and Boundless DAS (Wu et al. 2023).

* :class:`DAS` / :class:`BoundlessDAS` — interchange of a learned rotated subspace between a base and a
  source run at one site (``intervention.py``), trained by ``DAS.fit`` (``fit.py``) on the shared
  :class:`~intervene.training.Trainer` with :class:`DASConfig`;
* ``evaluate.py`` — interchange intervention accuracy (:func:`iia`) and the quirky speaker-swap pairs;
* ``cli.py`` — ``intervene das fit | eval``.

Neither bakes: the edit depends on a second input (the source run) at call time.
"""

from intervene.methods.das import cli
from intervene.methods.das.config import DASConfig
from intervene.methods.das.evaluate import iia, speaker_swap_pairs
from intervene.methods.das.intervention import DAS, BoundaryMask, BoundlessDAS
from intervene.registry import register_method

_REFUSE = ("{} interchanges a subspace with a second run's activations (the source, given at call time); weights "
           "see only the input being run, so no weight edit reproduces it")
register_method("das", DAS, config=DASConfig, refuse=_REFUSE.format("DAS"), cli=cli.register)
register_method("boundless_das", BoundlessDAS, config=DASConfig, refuse=_REFUSE.format("Boundless DAS"))

__all__ = ["DAS", "BoundaryMask", "BoundlessDAS", "DASConfig", "iia", "speaker_swap_pairs"]
