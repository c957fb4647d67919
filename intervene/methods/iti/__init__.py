"""Inference-Time Intervention (Li, Patel, Viégas, Pfister, Wattenberg; NeurIPS 2023).

* :class:`ITI` — the hook-time shift of the chosen heads (``intervention.py``), fitted by ``ITI.fit``;
* :class:`ITIConfig` — its hyperparameters (``config.py``);
* ``fit.py`` — labelled texts, head activations, head ranking, directions and σ;
* ``bake.py`` — the exact bake into ``o_proj`` biases; ``evaluate.py`` / ``plots.py`` — α×K sweeps
  and figures; ``cli.py`` — ``intervene iti fit | eval | sweep``.
"""

from intervene.methods.iti import cli
from intervene.methods.iti.bake import bake_iti
from intervene.methods.iti.config import ITIConfig
from intervene.methods.iti.intervention import ITI
from intervene.registry import register_method

register_method("iti", ITI, config=ITIConfig, bake=bake_iti, cli=cli.register)

__all__ = ["ITI", "ITIConfig"]
