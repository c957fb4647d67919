"""``probe.json``: the probe's type, hyperparameters, learned metadata, batch shape and tensor specs.

Hyperparameters are checked against the registered class's own ``__init__`` signature (its type
hints, in strict mode), so a probe type defines its schema once, where it defines its parameters.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from intervene.schemas.base import FLOAT_DTYPE_NAMES, Count, Name, Strict, Text, Width, versions

FORMAT = "intervene.probe"
Scalar = int | float | bool | str | None


class TensorSpec(Strict):
    shape: Annotated[list[Count], Field(max_length=16)]
    dtype: Literal[FLOAT_DTYPE_NAMES]  # type: ignore[valid-type]


class ProbeConfig(Strict):
    format: Literal["intervene.probe"]
    format_version: versions(1, 1)  # type: ignore[valid-type]
    library_version: Text | None = None
    type: Name
    params: dict[str, Any]
    meta: dict[str, Scalar | Annotated[list[Scalar], Field(max_length=1 << 16)]] = {}
    batch_shape: Annotated[list[Width], Field(max_length=8)]
    tensors: dict[str, TensorSpec]


@functools.cache
def params_model(cls: type) -> type[BaseModel]:
    """A strict model of ``cls.__init__``'s keyword parameters (their type hints and defaults)."""
    init = vars(cls).get("__init__") or getattr(cls, "__init__")  # noqa: B009 -- the class's own signature
    hints = typing.get_type_hints(init)
    fields: dict[str, Any] = {}
    for name, p in inspect.signature(init).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[name] = (hints.get(name, Any), default)
    config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True)
    return create_model(f"{cls.__name__}Params", __config__=config, **fields)
