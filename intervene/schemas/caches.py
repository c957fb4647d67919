"""Cache indexes: the activation cache (``index.json``), the latent cache (``index.json``, which is also
its resume state) and delphi's per-module ``config.json``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints

from intervene.schemas.base import (
    FLOAT_DTYPE_NAMES,
    Count,
    Int64,
    JSONObject,
    PosInt,
    Sha256,
    SiteName,
    Strict,
    Text,
    Width,
    versions,
)

MAX_SHARDS = 1 << 20


# ---- the activation cache ---------------------------------------------------------------------------
class ShardEntry(Strict):
    file: Annotated[str, StringConstraints(pattern=r"^shard-[0-9]{5,9}\.safetensors$")]
    start: Count
    stop: Count
    bytes: PosInt
    sha256: Sha256


class ActivationIndex(Strict):
    format: Literal["intervene-activations"]
    format_version: versions(1, 1)  # type: ignore[valid-type]
    key: Sha256
    n: Count
    sites: Annotated[list[SiteName], Field(min_length=1, max_length=4096)]
    positions: Text | Int64 | Annotated[list[Int64], Field(min_length=1, max_length=1 << 16)]
    dtype: Literal[FLOAT_DTYPE_NAMES]  # type: ignore[valid-type]
    shapes: dict[str, Annotated[list[Count], Field(max_length=8)]]
    model: JSONObject = {}
    shards: Annotated[list[ShardEntry], Field(max_length=MAX_SHARDS)]
    complete: bool = False


# ---- the latent cache ----------------------------------------------------------------------------------
PartName = Annotated[str, StringConstraints(pattern=r"^shards/[0-9]{5}/[0-9]{6}\.safetensors$")]


class FileRecord(Strict):
    """Size and sha256 of one file of the cache (version 2)."""

    bytes: Count
    sha256: Sha256


class LatentIndex(Strict):
    """``index.json`` of a latent cache; ``files`` (version 2) records every file the index counts."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["intervene-latent-cache"]
    version: versions(1, 2)  # type: ignore[valid-type]
    site: SiteName
    ctx_len: Width
    n_seq: PosInt
    batch_size: PosInt
    buffer_size: Count
    shard_width: Width
    n_shards: Width
    d_sae: Width
    value_dtype: Literal[FLOAT_DTYPE_NAMES]  # type: ignore[valid-type]
    tokens_digest: Text | None = None
    encoder: JSONObject = {}
    encoder_digest: Text | None = None
    encoder_source: Any = None
    model: JSONObject = {}
    next_batch: Count
    n_parts: Count
    peak_buffer: Count = 0
    done: bool
    files: dict[str, FileRecord] | None = None
    # a rank's block of a data-parallel run: batches [first, last) (intervene/features/cache_ranks.py)
    block: Annotated[list[Count], Field(min_length=2, max_length=2)] | None = None


# ---- delphi ---------------------------------------------------------------------------------------------
class DelphiConfig(Strict):
    """delphi's ``CacheConfig`` plus ``model_name`` (and our ``intervene`` record when we exported it)."""

    model_config = ConfigDict(extra="allow")  # delphi adds settings across versions; none changes the entries

    cache_ctx_len: Width | None = None
    n_tokens: Count | None = None
    n_splits: PosInt | None = None
    batch_size: PosInt | None = None
    model_name: Text | None = None
    intervene: JSONObject | None = None
