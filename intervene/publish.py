"""Publish baked models: bake, ``save_pretrained`` with a model card, push to the Hub in one commit.

>>> bake_and_push(ivm, "user/model-truthful", tokenizer=tok)
>>> AutoModelForCausalLM.from_pretrained("user/model-truthful")   # the hooked model's logits
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from intervene.bake import BakeReport, bake_with_report
from intervene.cards import baked_card
from intervene.diff_format import CARD_NAME
from intervene.hubio import upload_dir
from intervene.intervention import Intervention


class Edited(Protocol):
    """A model with interventions and their metadata: what an :class:`~intervene.Intervenable` is."""

    model: nn.Module
    interventions: Sequence[Intervention]
    metadata: Mapping[str, Any]


# Weight files a previous push may have left that from_pretrained would still pick up.
STALE_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")


def save_baked(model: nn.Module, report: BakeReport, directory: str | Path, tokenizer: Any = None,
               metadata: dict[str, Any] | None = None, repo_id: str | None = None) -> Path:
    """Write a baked ``model`` (safetensors), its generation config, ``tokenizer`` if given, and a
    model card (README.md) describing what was edited and how it was fitted."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    card = baked_card(report.interventions, report.edited, report.created, report.config_flags,
                      metadata=metadata, base_model=getattr(model.config, "_name_or_path", None), repo_id=repo_id)
    (directory / CARD_NAME).write_text(card)
    return directory


def bake_and_push(ivm: Edited, repo_id: str, tokenizer: Any = None, private: bool = False,
                  token: str | None = None, commit_message: str | None = None, revision: str | None = None) -> Any:
    """Bake ``ivm`` (an ``Intervenable``: its model, interventions and metadata; exactly, or ``NotBakeableError`` before anything is written) and push the model,
    tokenizer, generation config and card to ``repo_id`` (branch ``revision``) as one commit.

    Returns the ``huggingface_hub`` ``CommitInfo``. Weight files left by an earlier push to the same
    branch are deleted in that commit, so ``from_pretrained`` sees only the new weights.
    """
    model, report = bake_with_report(ivm.model, ivm.interventions)
    with tempfile.TemporaryDirectory() as tmp:
        save_baked(model, report, tmp, tokenizer=tokenizer, metadata=dict(ivm.metadata), repo_id=repo_id)
        return upload_dir(tmp, repo_id, private=private, token=token, revision=revision,
                          commit_message=commit_message or "Upload model with baked interventions (intervene)",
                          delete_stale=STALE_WEIGHTS)
