"""Model cards (README.md with YAML front matter) for diffs and baked models."""

from __future__ import annotations

import json
from typing import Any


def _front_matter(base_model: str | None, tags: list[str]) -> str:
    lines = ["---", "library_name: intervene"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    lines.append("---")
    return "\n".join(lines)


def diff_card(config: dict[str, Any], repo_id: str | None = None) -> str:
    """A card for an intervention diff: what it edits, how it was fitted, how to load it."""
    base = (config.get("base_model") or {}).get("name_or_path")
    rows = "\n".join(
        f"| `{e['name']}` | {e['type']} | {', '.join(f'`{s}`' for s in e['sites'])} | `{json.dumps(e.get('positions'))}` |"
        for e in config["interventions"])
    meta = config.get("metadata") or {}
    fitted = "\n".join(f"- **{k}**: {v}" for k, v in meta.items()) or "- (no fitting metadata recorded)"
    where = repo_id or "path/to/this/diff"
    return f"""{_front_matter(base, ["intervene", "intervention", "steering"])}

# Intervention diff{f' for {base}' if base else ''}

An [intervene](https://github.com/) diff: a few small tensors applied as forward hooks at inference
time. The base model's weights are unchanged.

| name | type | sites | positions |
|---|---|---|---|
{rows}

## How it was fitted
{fitted}

## How to load
```python
from transformers import AutoModelForCausalLM
from intervene import Intervenable

model = AutoModelForCausalLM.from_pretrained({base!r})
ivm = Intervenable.load({where!r}, model)
out = ivm.generate(**inputs, max_new_tokens=64)
```
Files: `intervene_config.json` (format version {config['format_version']}), `intervene_weights.safetensors`.
"""
