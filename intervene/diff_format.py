"""The diff format: ``intervene_config.json`` + ``intervene_weights.safetensors`` (+ a card).

File names are our own on purpose: ``config.json`` would make a repo look like a model to
transformers, ``adapter_config.json`` like a PEFT adapter.

Loading validates everything before any hook is registered (docs/architecture.md, "Validating
files"): the config against its schema (:mod:`intervene.schemas.diff`), the format version, the
base-model fingerprint, every site against the model, the weights file's sha256 (format 2), each
intervention's parameters and tensors through its type's ``from_saved``, and every tensor's shape
through ``bind``. Classes come only from the registry (no pickle, no import by name), and files are
read only through :class:`~intervene.safeio.Root` (regular files inside the directory).

A save is atomic for the whole diff: the new weights are written under a staging name that carries
their checksum, then the config (the commit point) is renamed into place, then the weights. A save
killed at any moment leaves the old diff or the new one loadable, never a mix (the checksum refuses
a mix, and the staged file completes a save killed after its commit). Saves to one directory take
turns under an exclusive lock and remove what killed saves left behind; loads take a shared lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from intervene.errors import (
    DiffFormatError,
    IncompatibleModelError,
    InterveneFileError,
    InterventionError,
    PositionsError,
    SiteError,
    UncheckedFileWarning,
    UnsupportedModelError,
)
from intervene.fileio import atomic_write_bytes, dir_lock, fsync_dir, sweep_temporaries
from intervene.intervention import Intervention
from intervene.load_sites import sites_for_load
from intervene.positions import Positions
from intervene.registry import lookup
from intervene.safeio import Root
from intervene.schemas.base import validate
from intervene.schemas.diff import DiffConfig
from intervene.sites import block_path, config_value, family_of, head_shape
from intervene.tensorfile import file_sha256, load_tensors

CONFIG_NAME = "intervene_config.json"
WEIGHTS_NAME = "intervene_weights.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 2
STAGED_PREFIX = ".intervene_weights."  # + sha256 + ".safetensors": a save's weights before they are moved in
MAX_WEIGHTS_BYTES = 1 << 40
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


def check_fingerprint(saved: Mapping[str, Any], model: nn.Module, path: Path | None = None) -> None:
    """Raise ``IncompatibleModelError`` naming every shape that differs (and the config file, when given)."""
    have = fingerprint(model)
    bad = [f"{k}: diff expects {saved[k]!r}, model has {have[k]!r}"
           for k in SHAPE_KEYS if saved.get(k) is not None and have.get(k) is not None and saved[k] != have[k]]
    if bad:
        where = f"{path}: base_model: " if path is not None else ""
        raise IncompatibleModelError(
            f"{where}this diff was made for {saved.get('name_or_path') or 'another model'} and does not fit "
            f"{have.get('name_or_path') or type(model).__name__}: " + "; ".join(bad), path=path, field="base_model")


# ---- saving ----------------------------------------------------------------------------------------
def _staged(sha: str) -> str:
    return f"{STAGED_PREFIX}{sha}.safetensors"


def _recover(directory: Path) -> None:
    """Under the exclusive lock: finish a save killed after its commit, drop what killed saves left."""
    sweep_temporaries(directory, (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, STAGED_PREFIX + "*"))
    staged = [p for p in directory.glob(f"{STAGED_PREFIX}*.safetensors") if p.is_file() and not p.is_symlink()]
    if not staged:
        return
    try:  # the directory may hold anything: read it as carefully as a load does
        want = _root(directory).read_json(CONFIG_NAME)["weights"]["sha256"]
    except (InterveneFileError, KeyError, TypeError):
        want = None
    for p in staged:
        if want is not None and p.name == _staged(want):
            os.replace(p, directory / WEIGHTS_NAME)  # the config already names these weights: complete the move
        else:
            p.unlink(missing_ok=True)


def save_diff(directory: Path, model: nn.Module, interventions: list[Intervention],
              metadata: Mapping[str, Any] | None = None, card: bool = True) -> Path:
    """Write ``interventions`` as a diff into ``directory`` (created), atomically as a whole."""
    import transformers

    from intervene.cards import diff_card
    from intervene.version import __version__

    directory = Path(directory)
    entries, tensors = [], {}
    for iv in interventions:
        if "." in iv.name:
            raise InterventionError(f"intervention name {iv.name!r} may not contain '.'")
        entries.append({"type": iv.type_name, "name": iv.name, "sites": list(iv.sites),
                        "positions": iv.positions.to_json(), "params": iv.params()})
        for k, t in iv.tensors().items():
            # clone: safetensors refuses shared storage, and a view must not drag its base along
            tensors[f"{iv.name}.{k}"] = t.detach().to("cpu").contiguous().clone()
    data = st_save(tensors, metadata={"format": "pt"})
    sha = hashlib.sha256(data).hexdigest()
    config = {
        "format_version": FORMAT_VERSION,
        "library": "intervene",
        "library_version": __version__,
        "transformers_version": transformers.__version__,
        "base_model": fingerprint(model),
        "interventions": entries,
        "metadata": dict(metadata or {}),
        "weights": {"sha256": sha, "bytes": len(data)},
    }
    try:
        text = json.dumps(config, indent=2, sort_keys=False, allow_nan=False, default=_json_default) + "\n"
    except ValueError as e:  # NaN or Inf in params / metadata: the file would not be JSON
        raise InterventionError(f"cannot store a non-finite number in {CONFIG_NAME}: {e}") from None
    directory.mkdir(parents=True, exist_ok=True)
    with dir_lock(directory, exclusive=True):
        _recover(directory)
        staged = directory / _staged(sha)
        atomic_write_bytes(staged, data)
        atomic_write_bytes(directory / CONFIG_NAME, text)  # the commit point
        os.replace(staged, directory / WEIGHTS_NAME)
        if card:
            atomic_write_bytes(directory / CARD_NAME, diff_card(config))
        fsync_dir(directory)
    return directory


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in intervene_config.json")


# ---- loading ---------------------------------------------------------------------------------------
def _root(directory: Path) -> Root:
    return Root(directory, DiffFormatError)


def read_config(directory: Path) -> dict[str, Any]:
    """Parse ``intervene_config.json`` and check it against the schema; the raw object is returned."""
    root = _root(Path(directory))
    if not root.exists(CONFIG_NAME):
        raise DiffFormatError.at(root.path, CONFIG_NAME, f"a {CONFIG_NAME}", note="not an intervene diff")
    raw = root.read_json(CONFIG_NAME)
    path = root.path / CONFIG_NAME
    if isinstance(raw, dict) and isinstance(raw.get("format_version"), int) \
            and not isinstance(raw["format_version"], bool) and raw["format_version"] > FORMAT_VERSION:
        raise DiffFormatError.at(path, "format_version", f"a version this intervene reads (1..{FORMAT_VERSION})",
                                 raw["format_version"], note="upgrade the library")
    cfg = validate(DiffConfig, raw, DiffFormatError, path)
    if cfg.format_version >= 2 and cfg.weights is None:
        raise DiffFormatError.at(path, "weights", "the weights file's sha256 and size (format version 2)")
    if cfg.format_version < 2 and cfg.weights is not None:
        raise DiffFormatError.at(path, "weights", "no weights record in a format version 1 config", "a record")
    names = [e.name for e in cfg.interventions]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DiffFormatError.at(path, "interventions", "unique names", dup)
    return raw


def _read_weights(root: Root, config: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors and, for a file that fails its checksum, the error to raise once nothing else fails."""
    record = config.get("weights")
    if not root.exists(WEIGHTS_NAME) and record is None:
        raise DiffFormatError.at(root.path, WEIGHTS_NAME, f"a {WEIGHTS_NAME}", note="the diff is incomplete")
    if record is None:
        tensors, _, _ = load_tensors(root, WEIGHTS_NAME, MAX_WEIGHTS_BYTES)
        return tensors, None
    if not root.exists(WEIGHTS_NAME) and root.exists(_staged(record["sha256"])):
        name = _staged(record["sha256"])  # a save killed after its commit: its weights are staged
    else:
        name = WEIGHTS_NAME
    tensors, _, sha = load_tensors(root, name, MAX_WEIGHTS_BYTES, digest=True)
    size = root.size(name)
    if sha == record["sha256"] and size == record["bytes"]:
        return tensors, None
    if name == WEIGHTS_NAME and root.exists(_staged(record["sha256"])):
        tensors, _, sha = load_tensors(root, _staged(record["sha256"]), MAX_WEIGHTS_BYTES, digest=True)
        size = root.size(_staged(record["sha256"]))
        if sha == record["sha256"] and size == record["bytes"]:
            return tensors, None
    return tensors, (f"{root.path / WEIGHTS_NAME}: sha256: expected {record['sha256']} ({record['bytes']} bytes, "
                     f"recorded in {CONFIG_NAME}), got {sha} ({size} bytes): the file is corrupt, or from another save")


def committed_weights(directory: Path) -> Path:
    """The weights file the config's checksum names: ``intervene_weights.safetensors``, or the staged file of a
    save killed after its commit (for copying a diff elsewhere, e.g. ``intervene push``)."""
    root = _root(Path(directory))
    with dir_lock(root.real, exclusive=False):
        record = read_config(directory).get("weights")
        if record is None:
            return root.path / WEIGHTS_NAME
        for name in (WEIGHTS_NAME, _staged(record["sha256"])):
            if root.exists(name) and file_sha256(root, name) == record["sha256"]:
                return root.path / name
    raise DiffFormatError.at(root.path / WEIGHTS_NAME, "sha256", f"{record['sha256']} (recorded in {CONFIG_NAME})",
                             note="the file is corrupt, or from another save")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The diff's tensors, verified against the config's checksum (format 2)."""
    root = _root(Path(directory))
    with dir_lock(root.real, exclusive=False):
        tensors, bad = _read_weights(root, read_config(directory))
    if bad:
        raise DiffFormatError(bad, path=root.path / WEIGHTS_NAME, field="sha256", expected="the recorded sha256")
    return tensors


def load_diff(directory: Path, model: nn.Module) -> tuple[list[Intervention], dict[str, Any]]:
    """Read and fully validate a diff against ``model``; returns interventions (not attached)."""
    root = _root(Path(directory))
    with dir_lock(root.real, exclusive=False):  # a concurrent save cannot be seen half done
        config = read_config(root.path)
        path = root.path / CONFIG_NAME
        check_fingerprint(config.get("base_model") or {}, model, path)
        plans = []
        for i, e in enumerate(config["interventions"]):
            try:
                cls = lookup(e["type"])
            except DiffFormatError as err:
                raise DiffFormatError(f"{path}: interventions[{i}].type: {err}", path=path,
                                      field=f"interventions[{i}].type", expected="a registered type") from None
            try:
                positions = Positions.from_json(e.get("positions", "all"))
            except PositionsError as err:
                raise DiffFormatError.at(path, f"interventions[{i}].positions", "a positions spec",
                                         e.get("positions"), note=str(err)) from None
            plans.append((i, e, cls, positions, sites_for_load(model, e["sites"], path, f"interventions[{i}].sites")))
        weights, bad = _read_weights(root, config)
    if config["format_version"] < 2:
        warnings.warn(f"{path} is format version 1, which records no checksum: its weights were loaded without an "
                      "integrity check. Save it again to add one.", UncheckedFileWarning, stacklevel=3)
    out: list[Intervention] = []
    claimed: set[str] = set()
    for i, e, cls, positions, sites in plans:
        prefix = f"{e['name']}."
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        claimed |= {prefix + k for k in own}
        field = f"interventions[{i}]"
        try:
            iv = cls.from_saved(list(e["sites"]), positions, e["name"], dict(e.get("params") or {}), own)
        except (InterventionError, PositionsError) as err:
            raise DiffFormatError(f"{path}: {field} ({e['name']!r}, {e['type']}): {err}", path=path,
                                  field=field) from None
        kept = set(iv.tensors())
        if kept != set(own):
            raise DiffFormatError.at(root.path / WEIGHTS_NAME, f"tensors of {e['name']!r}", f"exactly {sorted(kept)}",
                                     sorted(own))
        try:
            iv.bind(sites)
        except (SiteError, InterventionError) as err:
            raise IncompatibleModelError(f"intervention {e['name']!r} does not fit this model: {err}",
                                         path=path, field=field) from None
        out.append(iv)
    extra = set(weights) - claimed
    if extra:
        raise DiffFormatError.at(root.path / WEIGHTS_NAME, "tensors", "only tensors an intervention claims",
                                 sorted(extra)[:5])
    if bad:
        raise DiffFormatError(bad, path=root.path / WEIGHTS_NAME, field="sha256", expected="the recorded sha256")
    return out, dict(config.get("metadata") or {})
