"""pyvene intervention directories: ``config.json`` (an ``IntervenableConfig``) and its representations.

pyvene saves a ``transformers.PretrainedConfig``, so generic config keys (``transformers_version``,
``model_type``...) may appear and change nothing; every key that says what is edited is typed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from intervene.schemas.base import Index, PosInt, Strict, Text, Width

MAX_REPRESENTATIONS = 4096
# RepresentationConfig's fields, in order, with pyvene's defaults
FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension", "intervention_type",
          "intervention", "subspace_partition", "group_key", "intervention_link_key", "moe_key",
          "source_representation", "hidden_source_representation", "latent_dim")
DEFAULTS = {"layer": 0, "component": "block_output", "unit": "pos", "max_number_of_units": 1}


class Representation(Strict):
    layer: Index = 0
    component: Text = "block_output"
    unit: Text = "pos"
    max_number_of_units: PosInt | None = 1
    low_rank_dimension: Any = None
    intervention_type: Any = None
    intervention: Any = None
    subspace_partition: Any = None
    group_key: Any = None
    intervention_link_key: Any = None
    moe_key: Any = None
    source_representation: Any = None
    hidden_source_representation: Any = None
    latent_dim: Any = None


Reps = Annotated[list[Annotated[list[Any], Field(max_length=len(FIELDS))] | dict[str, Any]],
                 Field(min_length=1, max_length=MAX_REPRESENTATIONS)]


class PyveneConfig(Strict):
    model_config = ConfigDict(extra="allow")  # PretrainedConfig's own keys

    representations: Reps
    intervention_types: Annotated[list[Text], Field(min_length=1, max_length=MAX_REPRESENTATIONS)]
    mode: Literal["parallel", "serial"] = "parallel"
    sorted_keys: Annotated[list[Text], Field(max_length=MAX_REPRESENTATIONS)] | None = None
    intervention_dimensions: Annotated[list[Width | None], Field(max_length=MAX_REPRESENTATIONS)] | None = None
    intervention_constant_sources: Annotated[list[bool], Field(max_length=MAX_REPRESENTATIONS)] | None = None
