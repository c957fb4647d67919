"""``intervene_config.json``, format versions 1 and 2.

Version 2 adds ``weights``: the sha256 and size of ``intervene_weights.safetensors``, checked on
every load (a mismatch is a ``DiffFormatError`` naming the file). Version 1 files have no checksum;
they still load, with an :class:`~intervene.errors.UncheckedFileWarning`.

Each intervention's ``params`` is validated by its own type's ``from_saved`` (its schema lives with
the method); ``positions`` by :class:`~intervene.positions.Positions`; ``metadata`` is free-form.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from intervene.schemas.base import Count, JSONObject, Name, Sha256, SiteName, Strict, Text, Width, versions

MAX_INTERVENTIONS = 4096
MAX_SITES = 4096


class Fingerprint(Strict):
    """What a diff records about its base model (``None``: unknown, not checked)."""

    name_or_path: Text | None = None
    revision: Text | None = None
    model_type: Text | None = None
    hidden_size: Width | None = None
    num_hidden_layers: Width | None = None
    num_attention_heads: Width | None = None
    num_key_value_heads: Width | None = None
    head_dim: Width | None = None


class Entry(Strict):
    """One intervention: its registered type, unique name, sites, positions and hyperparameters."""

    type: Name
    name: Name
    sites: Annotated[list[SiteName], Field(min_length=1, max_length=MAX_SITES)]
    positions: Any = "all"  # checked by Positions.from_json (a name, indices, or per-example indices)
    params: JSONObject = {}

    @field_validator("sites")
    @classmethod
    def _distinct(cls, sites: list[str]) -> list[str]:
        if len(set(sites)) != len(sites):
            raise ValueError("distinct site names")
        return sites


class Weights(Strict):
    """The weights file's checksum (version 2)."""

    sha256: Sha256
    bytes: Count


class DiffConfig(Strict):
    format_version: versions(1, 2)  # type: ignore[valid-type]
    library: Literal["intervene"] = "intervene"
    library_version: Text | None = None
    transformers_version: Text | None = None
    base_model: Fingerprint = Fingerprint()
    interventions: Annotated[list[Entry], Field(max_length=MAX_INTERVENTIONS)]
    metadata: JSONObject = {}
    weights: Weights | None = None
