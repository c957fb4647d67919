"""Representation fine-tuning (Wu et al. 2024): LoReFT and DiReFT.

* :class:`LoReFT` / :class:`DiReFT` — low-rank edits ``h + Rᵀ(W h + b − R h)`` / ``h + W₂ᵀ(W₁ h + b)`` at one
  site (``intervention.py``), trained by ``LoReFT.fit`` (``fit.py``) on the shared
  :class:`~intervene.training.Trainer` with :class:`ReFTConfig`;
* ``bake.py`` — the exact bake at positions ``"all"`` into the linear layer whose input or output they edit;
* ``cli.py`` — ``intervene reft fit | eval``.
"""

from intervene.methods.reft import cli
from intervene.methods.reft.bake import bake_reft
from intervene.methods.reft.config import ReFTConfig
from intervene.methods.reft.intervention import DiReFT, LoReFT
from intervene.registry import register_method

register_method("loreft", LoReFT, config=ReFTConfig, bake=bake_reft, cli=cli.register)
register_method("direft", DiReFT, config=ReFTConfig, bake=bake_reft)

__all__ = ["DiReFT", "LoReFT", "ReFTConfig"]
