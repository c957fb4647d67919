"""Saving and loading probes: JSON (type name, hyperparameters, metadata) + safetensors (tensors).

No pickle, and no class is ever imported by a name found in a file: the JSON's ``type`` is looked up
in the probe registry (:func:`~intervene.probes.base.register_probe`). Anything malformed —
unparsable JSON, a truncated safetensors file, unknown keys, hyperparameters of the wrong type,
tensors missing, of the wrong shape or dtype, or not finite — raises
:class:`~intervene.probes.base.ProbeFormatError` naming the file and the field
(schema: :mod:`intervene.schemas.probe`).

Layout: ``probe.save("dir")`` writes ``dir/probe.json`` + ``dir/probe.safetensors``;
``probe.save("name.json")`` (or ``"name.safetensors"``) writes ``name.json`` + ``name.safetensors``.
:func:`probe_to_state` / :func:`probe_from_state` expose the same (config, tensors) pair for
embedding a probe in another file format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from intervene.errors import ProbeFormatError, ProbeNotFoundError
from intervene.fileio import atomic_write
from intervene.probes.registry import lookup_probe
from intervene.safeio import Root
from intervene.schemas.base import validate
from intervene.schemas.probe import ProbeConfig, params_model
from intervene.tensorfile import check_tensor, load_tensors

# A Probe (intervene.probes.base), typed loosely: the base class imports this module for save/load.
Probe = Any

FORMAT = "intervene.probe"
FORMAT_VERSION = 1
_CONFIG_NAME = "probe.json"
_TENSORS_NAME = "probe.safetensors"
MAX_TENSOR_BYTES = 1 << 36

__all__ = ["load_probe", "probe_from_state", "probe_to_state", "save_probe"]


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        return p.with_suffix(".json"), p.with_suffix(".safetensors")
    return p / _CONFIG_NAME, p / _TENSORS_NAME


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where} is not JSON-serialisable ({value!r}): {e}") from None
    return value


def probe_to_state(probe: Probe) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON-able config and the (contiguous, de-aliased, CPU) tensors of a fitted probe."""
    from intervene.version import __version__

    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in probe._learned_tensors().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "type": probe.probe_type,
        "params": {k: _jsonable(v, f"hyperparameter {k}") for k, v in probe.get_params().items()},
        "meta": {k: _jsonable(v, f"attribute {k}") for k, v in probe._learned_meta().items()},
        "batch_shape": list(probe.batch_shape_),
        "tensors": {
            k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for k, t in tensors.items()
        },
    }
    return config, tensors


def probe_from_state(config: Any, tensors: dict[str, torch.Tensor], where: str | Path | None = None) -> Probe:
    """Rebuild a probe from :func:`probe_to_state`'s output, validating everything first.

    The config is checked against :class:`~intervene.schemas.probe.ProbeConfig`, the hyperparameters
    against the probe class's own signature (strict types), the metadata against the class's learned
    attributes, and every tensor (floating, finite, the shape and dtype the config lists, consistent
    with ``batch_shape``). ``where`` names the file in errors.
    """
    cfg = validate(ProbeConfig, config, ProbeFormatError, where)
    try:
        cls = lookup_probe(cfg.type)
    except ProbeFormatError as e:
        raise ProbeFormatError(f"{where}: type: {e}" if where else str(e), path=where, field="type",
                               expected="a registered probe type") from None
    params = validate(params_model(cls), cfg.params, ProbeFormatError, where, "params").model_dump(
        include=set(cfg.params))
    unknown = sorted(set(cfg.meta) - set(cls._meta_attrs))
    if unknown:
        raise ProbeFormatError.at(where, f"meta.{unknown[0]}", f"one of {list(cls._meta_attrs)}", unknown[0])
    try:
        probe = cls(**params)
    except (TypeError, ValueError) as e:
        raise ProbeFormatError.at(where, "params", f"hyperparameters {cls.__name__} accepts", note=str(e)) from None
    expected = set(cls._tensor_attrs)
    if set(cfg.tensors) != expected:
        raise ProbeFormatError.at(where, "tensors", f"exactly {sorted(expected)} for {cls.__name__}", sorted(cfg.tensors))
    if set(tensors) != expected:
        raise ProbeFormatError.at(where, "tensors", f"the file to hold exactly {sorted(expected)}", sorted(tensors))
    batch = tuple(cfg.batch_shape)
    for name, core in cls._tensor_attrs.items():
        t, spec = tensors[name], cfg.tensors[name]
        check_tensor(t, ProbeFormatError, where, f"tensor {name!r}")
        if list(t.shape) != spec.shape or str(t.dtype).removeprefix("torch.") != spec.dtype:
            raise ProbeFormatError.at(where, f"tensors.{name}", f"shape {spec.shape} and dtype {spec.dtype}",
                                      f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}")
        if t.ndim != len(batch) + core or tuple(t.shape[: len(batch)]) != batch:
            raise ProbeFormatError.at(where, f"tensors.{name}", f"batch_shape {list(batch)} then {core} dims",
                                      list(t.shape))
    feature_dims = {tensors[name].shape[-1] for name, core in cls._tensor_attrs.items() if core == 1}
    if len(feature_dims) > 1:
        raise ProbeFormatError.at(where, "tensors", "one feature dimension", sorted(feature_dims))
    probe._set_learned(dict(tensors), dict(cfg.meta))
    return probe


def save_probe(probe: Probe, path: str | Path) -> Path:
    """Write ``probe`` to ``path`` (a directory, or a ``.json``/``.safetensors`` file stem).

    Both files are written to temporary names and renamed into place, so an interrupted save never
    leaves a half-written file under the final name. Returns the JSON file's path.
    """
    config, tensors = probe_to_state(probe)
    config_path, tensors_path = _paths(path)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(tensors_path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(config_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return config_path


def load_probe(path: str | Path) -> Probe:
    """Load a probe written by :meth:`Probe.save` (a directory, or the ``.json``/``.safetensors`` path).

    Both files are read through :class:`~intervene.safeio.Root` (regular files inside the given
    directory only; a FIFO, a device or a symlink leading elsewhere is refused).

    Raises:
        ProbeNotFoundError: nothing at ``path`` (a ``FileNotFoundError``).
        ProbeFormatError: the files are corrupt, truncated, incomplete or inconsistent, or name a
            probe type that is not registered.
    """
    config_path, tensors_path = _paths(path)
    if not os.path.lexists(config_path.parent) or not os.path.lexists(config_path):
        raise ProbeNotFoundError.at(config_path, None, "a saved probe", note=f"nothing at {path}")
    root = Root(config_path.parent, ProbeFormatError)
    if not root.exists(tensors_path.name):
        raise ProbeFormatError.at(tensors_path, None, f"{tensors_path.name} beside {config_path.name}",
                                  note="the probe is incomplete")
    config = root.read_json(config_path.name)
    tensors, _, _ = load_tensors(root, tensors_path.name, MAX_TENSOR_BYTES)
    return probe_from_state(config, tensors, where=config_path)
