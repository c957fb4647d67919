"""CounterFact (ROME's format) as REMEDI samples, read from a local JSON / JSON-lines file.

A ROME record::

    {"case_id": 0,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "target_new": {"str": "English"}, "target_true": {"str": "French"}},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...],
     "attribute_prompts": [...], "generation_prompts": [...]}

becomes a sample with ``entity`` (the subject), ``prompt`` (``prompt.format(subject)``), ``target_new`` /
``target_true`` (with a leading space, as they follow the prompt), and a REMEDI ``context`` built from
the rewrite itself, ``"{prompt} {target_new}."``, whose ``attribute`` is the new target's text. Neighborhood
prompts are about *other* subjects that share the true object, so their ``neighborhood_targets`` are
``target_true`` (what ROME scores them against). ``requested_rewrite`` may also be a list (MEMIT's
multi-rewrite records): one sample per rewrite, sharing the record's prompts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["counterfact_sample", "load_counterfact", "split_samples"]


def _text(target: Any, what: str) -> str:
    if isinstance(target, Mapping):
        target = target.get("str")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"CounterFact: {what} must be a non-empty string or {{'str': ...}}, got {target!r}")
    return target.strip()


def _space(s: str) -> str:
    return s if s.startswith(" ") else " " + s


def counterfact_sample(record: Mapping[str, Any], rewrite: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One REMEDI sample from a ROME-format record (``rewrite`` picks one of several requested rewrites)."""
    rw = rewrite if rewrite is not None else record.get("requested_rewrite")
    if not isinstance(rw, Mapping):
        raise ValueError("CounterFact: the record has no requested_rewrite object")
    template, subject = rw.get("prompt"), rw.get("subject")
    if not isinstance(template, str) or "{}" not in template:
        raise ValueError(f"CounterFact: requested_rewrite.prompt must contain '{{}}', got {template!r}")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"CounterFact: requested_rewrite.subject must be a non-empty string, got {subject!r}")
    new = _text(rw.get("target_new"), "target_new")
    true = _text(rw["target_true"], "target_true") if rw.get("target_true") is not None else None
    prompt = template.format(subject)
    neighborhood = [str(p) for p in record.get("neighborhood_prompts", [])]
    sample: dict[str, Any] = {
        "id": record.get("case_id", record.get("id")),
        "entity": subject,
        "context": f"{prompt} {new}.",
        "attribute": new,
        "prompt": prompt,
        "target_new": _space(new),
        "target_true": None if true is None else _space(true),
        "paraphrase_prompts": [str(p) for p in record.get("paraphrase_prompts", [])],
        "neighborhood_prompts": neighborhood,
        "neighborhood_targets": [] if true is None else [_space(true)] * len(neighborhood),
        "relation": rw.get("relation_id"),
    }
    for key in ("attribute_prompts", "generation_prompts"):
        if key in record:
            sample[key] = [str(p) for p in record[key]]
    return sample


def _records(path: Path) -> list[Mapping[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON lines
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is neither JSON nor JSON lines: {e}") from None
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, Mapping) for r in data):
        raise ValueError(f"{path}: expected a list of CounterFact records")
    return data


def load_counterfact(path: str | Path, n: int | None = None) -> list[dict[str, Any]]:
    """REMEDI samples from a CounterFact file (ROME's ``counterfact.json``, MEMIT's multi-rewrite file,
    or JSON lines of the same records); the first ``n`` samples when ``n`` is given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CounterFact file at {path}")
    out: list[dict[str, Any]] = []
    for i, rec in enumerate(_records(path)):
        rws = rec.get("requested_rewrite")
        try:
            if isinstance(rws, list):
                out += [counterfact_sample(rec, rw) for rw in rws]
            else:
                out.append(counterfact_sample(rec))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}, record {i}: {e}") from None
        if n is not None and len(out) >= n:
            return out[:n]
    return out


def split_samples(samples: list[dict[str, Any]], test_fraction: float = 0.2, seed: int = 0
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded train / test split that keeps every subject on one side (no subject leaks into test)."""
    import random

    subjects = sorted({s["entity"] for s in samples})
    random.Random(seed).shuffle(subjects)
    n_test = max(1, round(len(subjects) * test_fraction)) if len(subjects) > 1 and test_fraction > 0 else 0
    test_subjects = set(subjects[:n_test])
    return ([s for s in samples if s["entity"] not in test_subjects],
            [s for s in samples if s["entity"] in test_subjects])
