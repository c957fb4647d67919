"""REMEDI: learned representation editors (Hernandez, Li & Andreas, 2023).

* :class:`Remedi` / :class:`RemediEditor` — the per-example edit and the learned map (``intervention.py``),
  trained by ``Remedi.fit`` (``train.py``: the editing loss and the loop) with :class:`RemediConfig`;
* ``states.py`` — entity / attribute token spans and hidden states; ``inspect.py`` — reading attributes
  out of entity representations; ``evaluate.py`` — efficacy, paraphrase, neighborhood, fluency;
* ``cli.py`` — ``intervene remedi fit | eval``.

REMEDI does not bake: its edit is computed from each input.
"""

from intervene.methods.remedi import cli
from intervene.methods.remedi.config import RemediConfig
from intervene.methods.remedi.intervention import Remedi, RemediEditor
from intervene.registry import register_method

register_method(
    "remedi", Remedi, config=RemediConfig, cli=cli.register,
    refuse="REMEDI edits depend on the input (a direction computed from each prompt's context, added at its "
           "entity's token), so no weight edit reproduces them; keep it as a diff")

__all__ = ["Remedi", "RemediConfig", "RemediEditor"]
