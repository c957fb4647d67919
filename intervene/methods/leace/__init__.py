"""Concept erasure with LEACE (Belrose, Schneider-Joseph, Ravfogel, Cotterell, Raff & Biderman, 2023).

* :class:`ConceptErasure` — fitted erasers applied at hook time, at any site and positions
  (``intervention.py``), fitted by ``ConceptErasure.fit`` (``fit.py``, with ``concept-erasure``'s
  ``LeaceFitter``) under :class:`ConceptErasureConfig` (``config.py``);
* ``bake.py`` — exact bakes at a linear layer's input (``layers.{i}.heads``) or a writer's output;
* ``evaluate.py`` — erasing the quirky speaker: how far Bob's answers move toward Alice's, at what CE cost;
* ``cli.py`` — ``intervene erase fit | quirky``.
"""

from intervene.methods.leace import cli
from intervene.methods.leace.bake import bake_concept_erasure
from intervene.methods.leace.config import ConceptErasureConfig
from intervene.methods.leace.intervention import ConceptErasure
from intervene.registry import register_method

register_method("concept_erasure", ConceptErasure, config=ConceptErasureConfig, bake=bake_concept_erasure,
                cli=cli.register)

__all__ = ["ConceptErasure", "ConceptErasureConfig"]
