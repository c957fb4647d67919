"""Rows from local files (jsonl / json / csv / tsv), HF ``datasets``, or the quirky generator.

Every loader returns a list of plain dicts. :func:`load_dataset_rows` resolves the DATASET argument
of the CLI: ``quirky:<task>``, a local path, or a Hugging Face dataset name (``name`` or
``name:config``). ``datasets`` is imported only when a Hub dataset is asked for.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from intervene.errors import DatasetUnavailableError

QUIRKY_PREFIX = "quirky:"
SPLIT_ALIASES = {"validation": "test", "val": "test", "dev": "test", "eval": "test"}


def _cell(key: str, value: str) -> Any:
    """Parse a CSV cell: JSON lists/objects, and integers in label columns."""
    text = value.strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    if (key == "label" or key.endswith("_label")) and re.fullmatch(r"-?\d+", text):
        return int(text)
    return value


def load_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of a ``.jsonl``, ``.json`` (a list of objects), ``.csv`` or ``.tsv`` file."""
    p = Path(path)
    if not p.is_file():
        raise DatasetUnavailableError(f"no such dataset file: {p}")
    suffix = p.suffix.lower()
    rows: list[dict]
    try:
        if suffix == ".jsonl":
            rows = []
            with p.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        rows.append(json.loads(line))
                    if limit is not None and len(rows) >= limit:
                        break
        elif suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            rows = data["rows"] if isinstance(data, dict) and "rows" in data else data
        elif suffix in (".csv", ".tsv"):
            with p.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows = [{k: _cell(k, v or "") for k, v in r.items()} for r in reader]
        else:
            raise DatasetUnavailableError(f"{p}: unknown format {suffix!r} (use .jsonl, .json, .csv or .tsv)")
    except json.JSONDecodeError as e:
        raise DatasetUnavailableError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetUnavailableError(f"{p} does not hold a list of objects")
    return normalize_rows(rows[:limit] if limit is not None else rows)


def normalize_rows(rows: Sequence[Mapping]) -> list[dict]:
    """Plain dicts with an integer ``label`` (from a boolean ``label`` or ``answer`` if needed)."""
    out = []
    for r in rows:
        row = dict(r)
        if "label" not in row and isinstance(row.get("answer"), bool):
            row["label"] = row["answer"]
        if isinstance(row.get("label"), bool):
            row["label"] = int(row["label"])
        out.append(row)
    return out


def load_hf_dataset(name: str, split: str = "train", config: str | None = None, revision: str | None = None,
                    limit: int | None = None, **kwargs: Any) -> list[dict]:
    """Rows of a Hugging Face dataset split; raises :class:`DatasetUnavailableError` naming the dataset."""
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailableError(f"loading {name!r} from the Hub needs the `datasets` package: "
                                      "pip install 'intervene[datasets]'") from None
    what = f"{name}" + (f" ({config})" if config else "") + f", split {split!r}"
    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision, **kwargs)
    except Exception as e:  # offline, not cached, no such repo or split: one clear error
        offline = getattr(datasets.config, "HF_HUB_OFFLINE", False) or getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
        hint = " (offline mode is on and it is not in the local cache)" if offline else ""
        raise DatasetUnavailableError(f"dataset {what} is unavailable{hint}: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return normalize_rows([dict(r) for r in ds])


def _stable_unit(key: str, seed: int) -> float:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") / 2**64


def split_rows(rows: Sequence[Mapping], split: str, test_fraction: float = 0.2, seed: int = 0) -> list[dict]:
    """Deterministic train/test split by a hash of each row's question id (its templates stay together)."""
    from intervene.data.contrast import question_id

    split = SPLIT_ALIASES.get(split, split)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [dict(r) for i, r in enumerate(rows)
            if (_stable_unit(question_id(r, i), seed) < test_fraction) == (split == "test")]


def is_quirky(spec: str) -> bool:
    return str(spec).startswith(QUIRKY_PREFIX)


def dataset_slug(spec: str) -> str:
    """A file-name-safe short name for a dataset spec (``quirky:addition`` -> ``quirky-addition``)."""
    text = Path(spec).stem if Path(spec).suffix in (".jsonl", ".json", ".csv", ".tsv") else str(spec)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "dataset"


def _hub_rows(spec: str, split: str, test_fraction: float, seed: int) -> list[dict]:
    """A Hub split; ``test`` falls back to ``validation``, then to a hash split of ``train``."""
    name, _, config = spec.partition(":")
    for candidate in ([split] if split == "train" else [split, "validation"]):
        try:
            return load_hf_dataset(name, split=candidate, config=config or None)
        except DatasetUnavailableError as e:
            if "Unknown split" not in str(e) and "ValueError" not in str(e):
                raise
    return split_rows(load_hf_dataset(name, split="train", config=config or None), split, test_fraction, seed)


def load_dataset_rows(
    spec: str,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    character: str | None = None,
    test_fraction: float = 0.2,
) -> list[dict]:
    """Rows of the DATASET spec for ``split`` (``train`` / ``test``), at most ``n`` of them.

    * ``quirky:<task>`` — :func:`intervene.data.quirky.quirky_dataset` (both characters, or ``character``);
    * a local file — its ``split`` column if it has one, else a hash split by question id;
    * anything else — a Hub dataset ``name`` or ``name:config`` (its own split, else a hash split of ``train``).

    ``character`` keeps rows whose ``character`` field equals it. Sampling beyond the first ``n`` rows
    is a seeded shuffle, so ``n`` gives a random, reproducible subset.
    """
    split = SPLIT_ALIASES.get(split, split)
    if is_quirky(spec):
        from intervene.data.quirky import CHARACTERS, quirky_dataset

        chars = (character,) if character else CHARACTERS
        n_questions = 500 if n is None else max(1, math.ceil(n / len(chars)))
        rows = quirky_dataset(spec[len(QUIRKY_PREFIX):], split=split, n=n_questions, characters=chars, seed=seed)
        return rows[:n] if n is not None else rows
    path = Path(spec)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv") or path.exists():
        rows = load_rows(path)
        if rows and "split" in rows[0]:
            rows = [r for r in rows if SPLIT_ALIASES.get(str(r.get("split")), str(r.get("split"))) == split]
        else:
            rows = split_rows(rows, split, test_fraction, seed)
    else:
        rows = _hub_rows(str(spec), split, test_fraction, seed)
    if character is not None:
        if rows and "character" not in rows[0]:
            raise DatasetUnavailableError(f"{spec} has no 'character' field to filter on")
        rows = [r for r in rows if r.get("character") == character]
    if n is not None and len(rows) > n:
        rng = random.Random(f"{spec}-{split}-{seed}")
        keep = sorted(rng.sample(range(len(rows)), n))
        rows = [rows[i] for i in keep]
    return rows
