"""Property-based tests (Hypothesis, derandomized) where generated values beat hand-written mutations:
any JSON for positions and method parameters, any bytes for the JSON reader, any tensors and any
corruption for our safetensors reader, checked against the safetensors library itself."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from intervene.errors import DiffFormatError, InterventionError, PositionsError
from intervene.positions import Positions
from intervene.registry import lookup
from intervene.safeio import Root, parse_json
from intervene.tensorfile import load_tensors
from tests.fuzz.formats import same_json

SETTINGS = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
SCALARS = st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=True) | st.text(max_size=8)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=20)


def _has(v: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(v, kinds):
        return True
    if isinstance(v, list):
        return any(_has(x, kinds) for x in v)
    if isinstance(v, dict):
        return any(_has(x, kinds) for x in v.values())
    return False


@SETTINGS
@given(JSON)
def test_positions_from_any_json_round_trip_or_refuse(value: Any) -> None:
    try:
        p = Positions.from_json(value)
    except PositionsError:
        return
    assert not _has(value, (bool, float)), f"{value!r} is not made of integer token indices"
    assert Positions.from_json(p.to_json()) == p
    if p.kind != "per_example":
        assert same_json(p.to_json(), value), "accepted positions are stored exactly as given"


@SETTINGS
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v, allow_nan=True).encode()))
def test_json_reader_answers_any_bytes_with_a_value_or_a_named_error(data: bytes) -> None:
    try:
        value = parse_json(data, DiffFormatError, "x.json")
    except DiffFormatError:
        return
    assert same_json(value, json.loads(data)), "the bounded reader agrees with json where it accepts"
    assert not (isinstance(value, float) and not math.isfinite(value))


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]
TENSORS = st.dictionaries(
    st.text(alphabet="abcdefgh._:", min_size=1, max_size=6),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)),
    max_size=4)


def _build(spec: dict[str, tuple[torch.dtype, list[int]]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: (torch.rand(shape, generator=g) * 3).to(dt) for k, (dt, shape) in spec.items()}


def _read(data: bytes) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "t.safetensors").write_bytes(data)
        tensors, _, _ = load_tensors(Root(d, DiffFormatError), "t.safetensors")
        return {k: v.clone() for k, v in tensors.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:  # bitwise: NaN payloads and -0.0 included
        return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)

    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(raw(a[k]), raw(b[k])) for k in a)


@SETTINGS
@given(TENSORS)
def test_safetensors_reader_equals_the_library(spec: dict[str, tuple[torch.dtype, list[int]]]) -> None:
    data = st_save(_build(spec))
    assert _same(_read(data), st_load(data))


@SETTINGS
@given(TENSORS, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 10**6))
def test_safetensors_reader_is_at_least_as_strict_as_the_library(spec, edits, cut) -> None:
    data = bytearray(st_save(_build(spec)))
    for pos, byte in edits:
        data[pos % len(data)] = byte
    data = bytes(data[: max(0, len(data) - cut % 9)])
    try:
        theirs = st_load(data)
    except Exception:  # noqa: BLE001 -- the library refuses: so must we
        with pytest.raises(DiffFormatError):
            _read(data)
        return
    try:
        ours = _read(data)
    except DiffFormatError:
        return  # stricter is fine (e.g. trailing bytes, bool bytes other than 0/1)
    assert _same(ours, theirs)


def _seed_tensors() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(32, generator=g)
    return {"steering": {"vector:layers.1": d}, "directional_ablation": {"direction:layers.1": d / d.norm()},
            "iti": {"direction": torch.nn.functional.normalize(torch.randn(1, 8, generator=g), dim=-1),
                    "sigma": torch.ones(1)}}


SITES = {"steering": ["layers.1"], "directional_ablation": ["layers.1"], "iti": ["layers.1.heads"]}
PARAMS = st.dictionaries(st.sampled_from(["scale", "value", "alpha", "heads", "fit", "extra"]), JSON, max_size=3)


@SETTINGS
@given(st.sampled_from(sorted(SITES)), PARAMS)
def test_method_params_are_taken_exactly_or_refused(type_name: str, params: dict[str, Any]) -> None:
    cls = lookup(type_name)
    try:
        iv = cls.from_saved(SITES[type_name], Positions.parse("all"), "x", params, _seed_tensors()[type_name])
    except (InterventionError, PositionsError):
        return
    saved = iv.params()
    for k, v in params.items():
        assert k in saved and same_json(saved[k], v) or (v == {} and k not in saved), f"params.{k}={v!r} coerced"
