"""What every file schema shares: a strict base model, bounded field types, and :func:`validate`.

The schemas are pydantic models in *strict* mode with unknown keys forbidden: ``true`` is not a
number, ``1.0`` is not an integer, ``"3"`` is not a number, ``NaN`` / ``Infinity`` are refused, and a
key the format does not define is an error rather than something silently dropped. Integers carry
explicit ranges, so a declared size can never ask for more than the file could hold.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from intervene.errors import file_error

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every schema: strict types, no unknown keys, finite floats, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True,
                              hide_input_in_errors=False)


# ---- bounded types -------------------------------------------------------------------------------
# (pydantic's default regex engine is Rust's, where `$` is the end of the text: "steer\n" does not match)
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[int, Field(ge=0, le=2**53)]  # a number of things in a file: rows, tokens, bytes
PosInt = Annotated[int, Field(ge=1, le=2**53)]
Width = Annotated[int, Field(ge=1, le=1 << 24)]  # hidden sizes, latent counts, head dims: 16M is beyond any model
Index = Annotated[int, Field(ge=0, le=1 << 24)]  # a layer, a head, a latent
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]+$", max_length=128)]
# Site names and patterns: canonical names, module paths, wildcards, :input / :output.
SiteName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:*?\-]+$", min_length=1, max_length=512)]
Text = Annotated[str, Field(max_length=4096)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
JSONObject = dict[str, Any]  # free-form (metadata, training records): already bounded by the JSON reader
FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def versions(lo: int, hi: int) -> Any:
    """An integer version in ``lo..hi`` (pydantic's ``Literal[1, 2]`` accepts ``true`` and ``1.0`` even in
    strict mode; a strict ``int`` with bounds does not)."""
    return Annotated[int, Field(ge=lo, le=hi)]


def pair(item: Any) -> Any:
    """A JSON list of exactly two ``item`` (strict mode refuses lists for tuples)."""
    return Annotated[list[item], Field(min_length=2, max_length=2)]


# ---- validation ----------------------------------------------------------------------------------
def _loc(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _expected(err: Any) -> str:  # a pydantic ErrorDetails
    kind, msg = err["type"], str(err["msg"])
    if kind == "missing":
        return "this required key"
    if kind == "extra_forbidden":
        return "no such key (the format does not define it)"
    for head in ("Input should be ", "Value should be ", "Value error, "):
        if msg.startswith(head):
            return msg[len(head):]
    return msg[:1].lower() + msg[1:]


def validate(model: type[M], data: Any, error: type[Exception], path: str | os.PathLike[str] | None,
             field: str = "") -> M:
    """``data`` as a ``model``, or ``error`` naming ``path``, the first offending field and what it needs.

    Alternatives of a union are reported together (``expected a valid string or a valid list``).
    Keys of free-form objects are never capitalised or bracketed in our formats, so a union's tags
    cannot be mistaken for them.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        loc = tuple(first["loc"])
        if loc and _is_tag(loc[-1]):  # a union: one error per alternative, tagged with its type last
            alts = [x for x in errors if tuple(x["loc"][:-1]) == loc[:-1] and x["loc"] and _is_tag(x["loc"][-1])]
            expected = " or ".join(dict.fromkeys(_expected(x) for x in alts))
            raise file_error(error, path, _loc(field, loc[:-1]), expected, first.get("input", ...)) from None
        got = ... if first["type"] == "missing" else first.get("input", ...)
        raise file_error(error, path, _loc(field, loc), _expected(first), got) from None


_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "tuple", "any"}


def _is_tag(part: Any) -> bool:
    """Whether a loc element names a union alternative (``str``, ``list[int]``, ``PerExample``), not a key."""
    return isinstance(part, str) and (part in _TAGS or "[" in part or part[:1].isupper())
