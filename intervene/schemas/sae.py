"""SAE ``cfg.json`` files we read: SAELens (6.x and the older flat layout) and EleutherAI sparsify.

Only the keys that change the SAE's math are typed here (strictly); SAELens's many training and
provenance keys take any JSON value, and which keys are allowed at all is decided by the parsers
(:mod:`intervene.features.saelens`, :mod:`intervene.features.sparsify`), which refuse the rest.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from intervene.schemas.base import Index, JSONObject, PosInt, Strict, Text, Width


class SAELensCfg(Strict):
    """The math-relevant keys of a SAELens ``cfg.json`` (other keys: see ``NO_MATH_KEYS``)."""

    model_config = ConfigDict(extra="allow")  # the parser refuses keys it does not list

    architecture: Text = "standard"
    # sizes may be absent, but not null: no SAELens version writes null there
    d_in: Width = None  # type: ignore[assignment]
    d_sae: Width = None  # type: ignore[assignment]
    d_out: Width = None  # type: ignore[assignment]
    dtype: Text | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: Text | bool | None = None
    reshape_activations: Text | None = None
    k: PosInt | None = None
    rescale_acts_by_decoder_norm: bool | None = None
    finetuning_scaling_factor: bool | float | None = None
    activation_fn: Text | None = None
    activation_fn_str: Text | None = None
    activation_fn_kwargs: JSONObject | None = None
    hook_name: Text | None = None
    hook_point: Text | None = None
    hook_head_index: Index | None = None
    hook_point_head_index: Index | None = None
    hook_name_out: Text | None = None
    hook_head_index_out: Index | None = None
    model_class_name: Text | None = None
    model_from_pretrained_kwargs: JSONObject | None = None
    metadata: JSONObject | None = None
    sae_lens_version: Text | None = None


class SAELensMeta(Strict):
    """The hook settings of a SAELens config (``metadata`` in 6.x, top level before)."""

    model_config = ConfigDict(extra="allow")

    hook_name: Text | None = None
    hook_head_index: Index | None = None
    hook_name_out: Text | None = None
    hook_head_index_out: Index | None = None
    model_class_name: Text | None = None
    model_from_pretrained_kwargs: JSONObject | None = None
    intervene_site: Text | None = None
    intervene_output_site: Text | None = None
    sae_lens_version: Text | None = None


class TopKKwargs(Strict):
    """``activation_fn_kwargs`` of a pre-6.0 top-k config."""

    model_config = ConfigDict(extra="allow")
    k: PosInt | None = None


class SparsifyCfg(Strict):
    """A sparsify ``cfg.json`` (``SparseCoderConfig`` plus ``d_in`` and our ``hookpoint`` / ``intervene_site``)."""

    activation: Literal["topk", "groupmax", "relu"] = "topk"
    k: PosInt = 32
    num_latents: Annotated[int, Field(ge=0, le=1 << 24)] = 0
    expansion_factor: PosInt | None = None
    transcode: bool = False
    skip_connection: bool = False
    d_in: Width = None  # type: ignore[assignment]  # absent allowed, null not (sparsify always writes it)
    hookpoint: Text | None = None
    intervene_site: Text | None = None
    normalize_decoder: bool | None = None
    multi_topk: bool | None = None
    training: Any = None  # a provenance record (examples/train_demo_sae.py)
