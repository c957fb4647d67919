"""The diff format: ``intervene_config.json`` + ``intervene_weights.safetensors`` (+ a card).

File names are our own on purpose: ``config.json`` would make a repo look like a model to
transformers, ``adapter_config.json`` like a PEFT adapter. Loading checks the JSON, the format
version, the base-model fingerprint and every tensor's shape before any hook is registered, and
builds classes only through the registry (no pickle, no import by name).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from intervene.errors import (
    DiffFormatError,
    IncompatibleModelError,
    InterventionError,
    SiteError,
    UnsupportedModelError,
)
from intervene.fileio import atomic_write
from intervene.intervention import Intervention
from intervene.positions import Positions
from intervene.registry import lookup
from intervene.sites import block_path, config_value, expand_sites, family_of, head_shape, resolve_site

CONFIG_NAME = "intervene_config.json"
WEIGHTS_NAME = "intervene_weights.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
# Fingerprint keys whose mismatch makes a diff unusable (name_or_path / revision only warn).
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim")


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a diff records about its base model: identity plus every shape that matters."""
    cfg = model.config
    fp: dict[str, Any] = {
        "name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "revision": getattr(cfg, "_commit_hash", None),
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": config_value(cfg, "hidden_size", "n_embd", "d_model"),
        "num_hidden_layers": config_value(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        "num_attention_heads": config_value(cfg, "num_attention_heads", "n_head"),
        "num_key_value_heads": config_value(cfg, "num_key_value_heads", "num_attention_heads", "n_head"),
        "head_dim": None,
    }
    try:  # the real per-head width (config.head_dim is absent or misleading in several families)
        _, block = block_path(model, 0)
        fp["head_dim"] = head_shape(model, block.get_submodule(family_of(model).attn_out))[1]
    except (UnsupportedModelError, SiteError, AttributeError):
        fp["head_dim"] = config_value(cfg, "head_dim")
    return fp


def check_fingerprint(saved: Mapping[str, Any], model: nn.Module) -> None:
    """Raise ``IncompatibleModelError`` naming every shape that differs."""
    have = fingerprint(model)
    bad = [f"{k}: diff expects {saved[k]!r}, model has {have[k]!r}"
           for k in SHAPE_KEYS if saved.get(k) is not None and have.get(k) is not None and saved[k] != have[k]]
    if bad:
        raise IncompatibleModelError(
            f"this diff was made for {saved.get('name_or_path') or 'another model'} and does not fit "
            f"{have.get('name_or_path') or type(model).__name__}: " + "; ".join(bad))


def save_diff(directory: Path, model: nn.Module, interventions: list[Intervention],
              metadata: Mapping[str, Any] | None = None, card: bool = True) -> Path:
    """Write ``interventions`` as a diff into ``directory`` (created; files replaced atomically)."""
    import transformers

    from intervene.cards import diff_card
    from intervene.version import __version__

    directory.mkdir(parents=True, exist_ok=True)
    entries, tensors = [], {}
    for iv in interventions:
        if "." in iv.name:
            raise InterventionError(f"intervention name {iv.name!r} may not contain '.'")
        entries.append({"type": iv.type_name, "name": iv.name, "sites": list(iv.sites),
                        "positions": iv.positions.to_json(), "params": iv.params()})
        for k, t in iv.tensors().items():
            # clone: safetensors refuses shared storage, and a view must not drag its base along
            tensors[f"{iv.name}.{k}"] = t.detach().to("cpu").contiguous().clone()
    config = {
        "format_version": FORMAT_VERSION,
        "library": "intervene",
        "library_version": __version__,
        "transformers_version": transformers.__version__,
        "base_model": fingerprint(model),
        "interventions": entries,
        "metadata": dict(metadata or {}),
    }
    text = json.dumps(config, indent=2, sort_keys=False, default=_json_default)
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))
    if card:
        atomic_write(directory / CARD_NAME, lambda p: Path(p).write_text(diff_card(config)))
    return directory


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in intervene_config.json")


def read_config(directory: Path) -> dict[str, Any]:
    """Parse and structurally check ``intervene_config.json``."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise DiffFormatError(f"{directory} has no {CONFIG_NAME}: not an intervene diff")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffFormatError(f"{path} is not valid JSON (corrupt or truncated): {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("interventions"), list):
        raise DiffFormatError(f"{path} has no list of interventions")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DiffFormatError(f"{path}: format_version {version!r} is not readable by this intervene "
                              f"(reads up to {FORMAT_VERSION}); upgrade the library")
    for entry in config["interventions"]:
        if not isinstance(entry, dict) or not {"type", "name", "sites"} <= set(entry):
            raise DiffFormatError(f"{path}: malformed intervention entry {entry!r}")
    return config


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise DiffFormatError(f"{directory} has no {WEIGHTS_NAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DiffFormatError(f"{path} is not a readable safetensors file (corrupt or truncated): {e}") from None


def load_diff(directory: Path, model: nn.Module) -> tuple[list[Intervention], dict[str, Any]]:
    """Read and fully validate a diff against ``model``; returns interventions (not attached)."""
    directory = Path(directory)
    config = read_config(directory)
    check_fingerprint(config.get("base_model") or {}, model)
    weights = read_weights(directory)
    out: list[Intervention] = []
    claimed: set[str] = set()
    for e in config["interventions"]:
        cls = lookup(e["type"])
        prefix = f"{e['name']}."
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        claimed |= {prefix + k for k in own}
        try:
            positions = Positions.from_json(e.get("positions", "all"))
            iv = cls.from_saved(list(e["sites"]), positions, e["name"], dict(e.get("params") or {}), own)
        except (InterventionError, KeyError, TypeError, ValueError) as err:
            raise DiffFormatError(f"intervention {e['name']!r} ({e['type']}) cannot be rebuilt: {err}") from None
        try:
            sites = {n: resolve_site(model, n) for n in expand_sites(model, iv.sites)}
            iv.bind(sites)
        except (SiteError, InterventionError) as err:
            raise IncompatibleModelError(f"intervention {e['name']!r} does not fit this model: {err}") from None
        out.append(iv)
    extra = set(weights) - claimed
    if extra:
        raise DiffFormatError(f"{WEIGHTS_NAME} holds tensors no intervention claims: {sorted(extra)[:5]}")
    return out, dict(config.get("metadata") or {})
