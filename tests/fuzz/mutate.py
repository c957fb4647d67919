"""Mutations of a copied seed, each returning what the loader must do with the result.

Expectations: ``reject`` (a named error), ``same`` (load, and give exactly the seed's result),
``same:<dir>`` (load, and give exactly that other seed's result), ``any`` (a named error, or a load
that passes the format's invariants). JSON expectations come from :mod:`tests.fuzz.spec`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.fuzz import spec
from tests.fuzz.seeds import Seed

SWAPS: list[Any] = [None, True, False, 0, 1, -1, 2.5, "x", "", [], {}, [1, 2], {"a": 1}]
STRINGS = ["", "x", "layers.99", "a" * 3000, "\u202e\u0001", "steer\n", "../../etc/passwd", "/dev/zero"]
INTS = [-1, 2**31, 2**40, 2**63 - 1, -(2**63)]
FLOATS = [0.0, -1.5, 1e308, -1e-320, 3]


@dataclass
class Case:
    seed: Seed
    root: Path  # the copy the loader is given
    outside: Path  # a sibling directory nothing may read or write
    rng: random.Random


def _files(c: Case) -> list[str]:
    return sorted(str(p.relative_to(c.root)) for p in c.root.rglob("*") if p.is_file() and not p.is_symlink())


def _pick(c: Case, suffix: str | tuple[str, ...] | None = None) -> str | None:
    names = [f for f in _files(c) if suffix is None or f.endswith(suffix)]
    return c.rng.choice(names) if names else None


def _required(c: Case, rel: str) -> bool:
    return rel in c.seed.required


def _or_any(c: Case, rel: str, want: str = "reject") -> str:
    return want if _required(c, rel) else "any"


# ---- JSON ------------------------------------------------------------------------------------------
def _nodes(v: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    out = [(path, v)]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _nodes(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _nodes(x, (*path, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


def _spec_file(c: Case) -> str | None:
    rel = spec.SPEC_FILES.get(c.seed.fmt)
    return rel if rel and (c.root / rel).is_file() else _pick(c, ".json")


def _expect_value(fmt: str, path: tuple[Any, ...], old: Any, new: Any) -> str:
    r = spec.rule(fmt, path)
    if r.free:
        return "any"
    if not spec.type_ok(r, new):
        return "reject"
    if r.enum is not None and isinstance(new, str) and new not in r.enum and "str" in r.types:
        return "reject"
    if r.exact and spec.json_type(new) == spec.json_type(old) and new != old:
        return "reject"
    return "any"


def json_structural(c: Case) -> tuple[str, str]:
    rel = _spec_file(c)
    if rel is None:
        return "no json", "same"
    doc = json.loads((c.root / rel).read_text())
    fmt = c.seed.fmt if rel == spec.SPEC_FILES.get(c.seed.fmt) else "?"
    nodes = _nodes(doc)
    kind = c.rng.choice(["delete", "add_key", "type_swap", "value", "value", "reorder"])
    path, old = c.rng.choice(nodes)
    expect = "any"
    if kind == "delete" and path:
        parent = _nodes(doc)[0][1]
        for k in path[:-1]:
            parent = parent[k]
        del parent[path[-1]]
        if isinstance(path[-1], int):
            expect = "reject" if spec.rule(fmt, path[:-1]).exact else "any"
        else:
            expect = "reject" if spec.rule(fmt, path).req else "any"
    elif kind == "add_key":
        dicts = [(p, v) for p, v in nodes if isinstance(v, dict)]
        path, node = c.rng.choice(dicts)
        node["fuzz_unknown_key"] = c.rng.choice([1, "x", None, [1]])
        r = spec.rule(fmt, path)
        expect = "any" if (r.open or r.free or fmt == "?") else "reject"
    elif kind == "type_swap":
        new = c.rng.choice([v for v in SWAPS if spec.json_type(v) != spec.json_type(old)])
        doc = _set(doc, path, new)
        expect = _expect_value(fmt, path, old, new)
    elif kind == "value":
        t = spec.json_type(old)
        r = spec.rule(fmt, path)
        if t == "int":
            new = c.rng.choice([old + 1, *INTS])
        elif t == "num":
            new = c.rng.choice(FLOATS)
        elif t == "str":
            new = c.rng.choice(STRINGS + list(r.enum or ()))
        elif t == "bool":
            new = not old
        else:
            new = old
        doc = _set(doc, path, new)
        expect = _expect_value(fmt, path, old, new)
    else:  # reorder keys and reformat: nothing changes
        kind = "reorder"
        doc = _reorder(doc, c.rng)
        expect = "same"
    if fmt == "?" and expect == "reject":
        expect = "any"
    (c.root / rel).write_text(json.dumps(doc, indent=c.rng.choice([None, 1, 4])))
    return f"json {kind} {rel}:{_show(path)}", expect


def _reorder(v: Any, rng: random.Random) -> Any:
    if isinstance(v, dict):
        items = list(v.items())
        rng.shuffle(items)
        return {k: _reorder(x, rng) for k, x in items}
    if isinstance(v, list):
        return [_reorder(x, rng) for x in v]
    return v


def _show(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)[:80]


def json_raw(c: Case) -> tuple[str, str]:
    """Mutations that only exist as text: deep nesting, huge numbers, NaN, duplicate keys, surrogates, BOM."""
    rel = _spec_file(c) or _pick(c, ".json")
    if rel is None:
        return "no json", "same"
    text = (c.root / rel).read_text()
    kind = c.rng.choice(["deep", "deep_mid", "bigint", "nan", "dupkey", "surrogate", "bom", "notobject", "huge"])
    if kind == "huge" and c.rng.random() < 0.8:
        kind = "bigint"  # 17 MB files are slow: keep them rare
    doc = json.loads(text)
    if kind in ("deep", "deep_mid"):
        depth = 100_000 if kind == "deep" else 80
        key = c.rng.choice(list(doc)) if isinstance(doc, dict) and doc else None
        nest = "[" * depth + "]" * depth
        text = json.dumps({**doc, key: "@@"}).replace('"@@"', nest) if key is not None else nest
    elif kind == "bigint":
        text = _replace_number(text, "1" + "0" * 5000, c)
    elif kind == "nan":
        text = _replace_number(text, c.rng.choice(["NaN", "Infinity", "-Infinity", "1e999"]), c)
    elif kind == "dupkey":
        text = text.replace("{", '{"format_version": 1, "format_version": 2, ', 1) if "{" in text else text
    elif kind == "surrogate":
        text = text.replace('"', '"\\ud800', 2) if text.count('"') >= 2 else text + '"\\ud800"'
    elif kind == "bom":
        text = "\ufeff" + text
    elif kind == "notobject":
        text = json.dumps(c.rng.choice([[], "x", 1, None, [doc]]))
    elif kind == "huge":
        text = text + " " * (17 << 20)
    (c.root / rel).write_text(text)
    return f"json raw {kind} {rel}", _or_any(c, rel) if text != (c.seed.root / rel).read_text() else "same"


def _replace_number(text: str, new: str, c: Case) -> str:
    import re

    spans = [m.span() for m in re.finditer(r"(?<=[:\[, ])-?\d+(\.\d+)?([eE][-+]?\d+)?", text)]
    if not spans:
        return text + new
    a, b = c.rng.choice(spans)
    return text[:a] + new + text[b:]


# ---- bytes -----------------------------------------------------------------------------------------
def byte_level(c: Case) -> tuple[str, str]:
    rel = _pick(c)
    if rel is None:
        return "no file", "same"
    p = c.root / rel
    data = bytearray(p.read_bytes())
    kind = c.rng.choice(["truncate", "bitflip", "bitflip", "append", "empty", "header_len"])
    is_st, is_json = rel.endswith(".safetensors"), rel.endswith(".json")
    if kind == "header_len" and not is_st:
        kind = "bitflip"
    if kind == "truncate" and data:
        cut = c.rng.randrange(len(data))
        removed = bytes(data[cut:])
        data = data[:cut]
        if is_json and not removed.strip():
            expect = "same"
        else:
            expect = _or_any(c, rel) if (is_st or is_json or rel.endswith((".bin", ".gguf"))) else "any"
    elif kind == "bitflip" and data:
        for _ in range(c.rng.randint(1, 3)):
            i = c.rng.randrange(len(data))
            data[i] ^= 1 << c.rng.randrange(8)
        expect = "reject" if rel in c.seed.checksummed else "any"
    elif kind == "append":
        junk = bytes(c.rng.randrange(256) for _ in range(c.rng.randint(1, 64)))
        data += junk
        expect = _or_any(c, rel) if (is_st or (is_json and junk.strip())) else "any"
        if is_json and not junk.strip():
            expect = "same"
    elif kind == "header_len" and len(data) >= 8:
        n = int.from_bytes(data[:8], "little")
        data[:8] = c.rng.choice([0, 1, n - 1, n + 1, len(data), 2**63, 2**64 - 1]).to_bytes(8, "little")
        expect = _or_any(c, rel)
    else:
        data = bytearray()
        expect = _or_any(c, rel)
    p.write_bytes(bytes(data))
    return f"bytes {kind} {rel}", expect


# ---- tensors ---------------------------------------------------------------------------------------
FLOATS_T = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor_level(c: Case) -> tuple[str, str]:
    rel = _pick(c, ".safetensors")
    if rel is None:
        return byte_level(c)
    p = c.root / rel
    t = load_file(str(p))
    meta = _metadata(p)
    name = c.rng.choice(sorted(t))
    x = t[name]
    kind = c.rng.choice(["nan", "nan", "dtype", "dtype", "shape", "drop", "add", "rename", "reshape"])
    fmt = c.seed.fmt
    checked = rel in c.seed.checksummed
    expect = "reject"
    if kind == "nan" and x.is_floating_point() and x.numel():
        x = x.clone()
        x.view(-1)[c.rng.randrange(x.numel())] = c.rng.choice([float("nan"), float("inf"), -float("inf")])
        if fmt == "latents" and name == "max":
            expect = "reject"  # checksummed anyway
    elif kind in ("nan", "dtype"):
        kind = "dtype"
        new = c.rng.choice([torch.int64, torch.int32, torch.bool, torch.float8_e4m3fn, *FLOATS_T, torch.int16])
        if new == x.dtype:
            new = torch.int64 if x.is_floating_point() else torch.float32
        if x.is_floating_point() and new in FLOATS_T:
            expect = "reject" if checked or fmt in ("probe", "acts", "latents") else "any"
        elif not x.is_floating_point() and not new.is_floating_point and new != torch.bool and fmt == "delphi":
            expect = "any"  # delphi's integer tensors may be any integer type
        x = x.to(new)
    elif kind == "shape" and x.numel() > 1:
        x = x.reshape(-1)[:-1].clone() if c.rng.random() < 0.5 else torch.cat([x.reshape(-1), x.reshape(-1)[:1]])
        expect = "any" if fmt == "delphi" and name == "tokens" else "reject"
    elif kind == "reshape" and x.ndim >= 1 and x.numel() > 1:
        x = x.reshape(1, *x.shape) if c.rng.random() < 0.5 else x.reshape(-1)
        expect = "reject" if checked or fmt in ("probe", "sae", "acts", "latents", "delphi") else "any"
        if fmt == "delphi" and name != "locations":
            expect = "any" if x.ndim == t[name].ndim else "reject"
    elif kind == "drop":
        del t[name]
        x = None
        expect = "any" if (fmt == "delphi" and name == "tokens") else "reject"
    elif kind == "add":
        t["fuzz_stowaway"] = torch.zeros(3)
    else:
        kind = "rename"
        t[name + "_renamed"] = x
        del t[name]
        x = None
    if x is not None:
        t[name] = x.contiguous()
    if not _required(c, rel) and expect == "reject":
        expect = "any"
    save_file(t, str(p), metadata=meta)
    return f"tensor {kind} {rel}:{name}", expect


def _metadata(p: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        return f.metadata()
