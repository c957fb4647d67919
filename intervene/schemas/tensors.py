"""The safetensors header: ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``.

The layout rules the schema cannot express (offsets contiguous from 0 to the end of the file, sizes
equal to ``prod(shape) * itemsize``) are checked by :mod:`intervene.tensorfile`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from intervene.schemas.base import Count, Strict, Text, pair

# safetensors dtype names -> torch dtype names (those torch can hold; F8_E8M0, F4, F6_* and C64 cannot)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
          "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
MAX_TENSORS = 1 << 20
MAX_NAME = 1024


class TensorEntry(Strict):
    """One tensor's header entry."""

    dtype: Text
    shape: Annotated[list[Count], Field(max_length=16)]
    data_offsets: pair(Count)  # type: ignore[valid-type]
