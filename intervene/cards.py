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


def _local_name(name: str | None) -> str | None:
    """A local model directory as a reader should see it: its last path component, not this machine's path."""
    if not name:
        return None
    from pathlib import PurePath

    return PurePath(name).name or name


def diff_card(config: dict[str, Any], repo_id: str | None = None) -> str:
    """A card for an intervention diff: what it edits, how it was fitted, how to load it."""
    recorded = (config.get("base_model") or {}).get("name_or_path")
    base = hub_model_id(recorded)  # only a Hub id goes into base_model: (an absolute path is useless elsewhere)
    local = None if base or not recorded else _local_name(recorded)
    rows = "\n".join(
        f"| `{e['name']}` | {e['type']} | {', '.join(f'`{s}`' for s in e['sites'])} | `{json.dumps(e.get('positions'))}` |"
        for e in config["interventions"])
    meta = config.get("metadata") or {}
    fitted = "\n".join(f"- **{k}**: {v}" for k, v in meta.items()) or "- (no fitting metadata recorded)"
    where = repo_id or "path/to/this/diff"
    if base:
        title, load = f" for {base}", f"model = AutoModelForCausalLM.from_pretrained({base!r})"
    elif local == "quirky-tiny":  # the demo model shipped with intervene
        title, load = " for intervene's demo model (quirky-tiny)", "model, tok = intervene.demo_model()"
    else:
        title = f" for a local model ({local})" if local else ""
        load = f"model = AutoModelForCausalLM.from_pretrained('path/to/{local or 'base-model'}')"
    sha = (config.get("weights") or {}).get("sha256")
    weights = f" (sha256 `{sha}`, checked on every load)" if sha else ""
    return f"""{_front_matter(base, ["intervene", "intervention", "steering"])}

# Intervention diff{title}

A diff of the intervene library: a few small tensors applied as forward hooks at inference
time. The base model's weights are unchanged.

| name | type | sites | positions |
|---|---|---|---|
{rows}

## How it was fitted
{fitted}

## How to load
```python
from transformers import AutoModelForCausalLM
import intervene
from intervene import Intervenable

{load}
ivm = Intervenable.load({where!r}, model)
out = ivm.generate(**inputs, max_new_tokens=64)
```
Files: `intervene_config.json` (format version {config['format_version']}), `intervene_weights.safetensors`{weights}.
"""


def hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id (``base_model`` in a card must be one), else ``None``."""
    import os

    if not name or name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name):
        return None
    return name


def baked_card(interventions: list[dict[str, Any]], edited: list[str], created: list[str],
               config_flags: dict[str, Any], metadata: dict[str, Any] | None = None,
               base_model: str | None = None, repo_id: str | None = None) -> str:
    """A card for a model with interventions baked into its weights (loads without intervene)."""
    base = hub_model_id(base_model)
    meta = dict(metadata or {})
    metrics = meta.pop("metrics", None)
    rows = "\n".join(
        f"| `{e['name']}` | {e['type']} | {', '.join(f'`{s}`' for s in e['sites'])} | `{json.dumps(e.get('params') or {})}` |"
        for e in interventions)
    fitted = "\n".join(f"- **{k}**: {v}" for k, v in meta.items()) or "- (no fitting metadata recorded)"
    if isinstance(metrics, dict) and metrics:
        metric_text = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    else:
        metric_text = "(no metrics recorded)"
    flags = ", ".join(f"`{k}={v}`" for k, v in config_flags.items()) or "none"
    changed = "\n".join(f"- `{n}`" for n in edited) or "- (none)"
    new = f"\n\nNew zero-initialised biases (created through the config flags above): {len(created)}." if created else ""
    where = repo_id or "path/to/this/model"
    return f"""{_front_matter(base, ["intervene", "baked", "steering"])}

# {'Baked intervention on ' + base if base else 'Model with baked interventions'}

The interventions below were written into the weights by
intervene's exact baking: the logits equal those of the base model with the
interventions applied as hooks (at every position; within float rounding). No extra code is needed to
load it.

| name | type | sites | params |
|---|---|---|---|
{rows}

## What changed in the weights
Config flags set: {flags}.

{changed}{new}

## How it was fitted
{fitted}

## Metrics
{metric_text}

## How to load
```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained({where!r})
```
"""
