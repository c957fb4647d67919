"""Saving and loading probes: JSON (type name, hyperparameters, metadata) + safetensors (tensors).

No pickle, and no class is ever imported by a name found in a file: the JSON's ``type`` is looked up
in the probe registry (:func:`~intervene.probes.base.register_probe`). Anything malformed —
unparsable JSON, a truncated safetensors file, unknown keys, tensors missing or of the wrong
shape — raises :class:`~intervene.probes.base.ProbeFormatError`.

Layout: ``probe.save("dir")`` writes ``dir/probe.json`` + ``dir/probe.safetensors``;
``probe.save("name.json")`` (or ``"name.safetensors"``) writes ``name.json`` + ``name.safetensors``.
:func:`probe_to_state` / :func:`probe_from_state` expose the same (config, tensors) pair for
embedding a probe in another file format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from intervene.errors import ProbeFormatError
from intervene.fileio import atomic_write
from intervene.probes.registry import lookup_probe

# A Probe (intervene.probes.base), typed loosely: the base class imports this module for save/load.
Probe = Any

FORMAT = "intervene.probe"
FORMAT_VERSION = 1
_CONFIG_NAME = "probe.json"
_TENSORS_NAME = "probe.safetensors"

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


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ProbeFormatError(msg)


def probe_from_state(config: Any, tensors: dict[str, torch.Tensor]) -> Probe:
    """Rebuild a probe from :func:`probe_to_state`'s output, validating everything first."""
    _expect(isinstance(config, dict), "probe config must be a JSON object")
    _expect(config.get("format") == FORMAT, f"not an intervene probe (format={config.get('format')!r})")
    version = config.get("format_version")
    _expect(
        isinstance(version, int) and 1 <= version <= FORMAT_VERSION, f"unsupported format_version {version!r}"
    )
    cls = lookup_probe(config.get("type"))  # type: ignore[arg-type]
    params, meta, specs = config.get("params"), config.get("meta", {}), config.get("tensors")
    batch_shape = config.get("batch_shape")
    _expect(
        isinstance(params, dict) and isinstance(meta, dict) and isinstance(specs, dict),
        "malformed probe config",
    )
    _expect(
        isinstance(batch_shape, list) and all(isinstance(b, int) and b >= 0 for b in batch_shape),
        "malformed batch_shape",
    )
    unknown = set(params) - set(cls._param_names())
    _expect(not unknown, f"unknown hyperparameters for {cls.__name__}: {sorted(unknown)}")
    try:
        probe = cls(**params)
    except (TypeError, ValueError) as e:
        raise ProbeFormatError(f"cannot build {cls.__name__} from the saved hyperparameters: {e}") from None
    expected = set(cls._tensor_attrs)
    _expect(
        set(specs) == expected,
        f"{cls.__name__} needs tensors {sorted(expected)}, config lists {sorted(specs)}",
    )
    _expect(
        set(tensors) == expected,
        f"{cls.__name__} needs tensors {sorted(expected)}, file has {sorted(tensors)}",
    )
    for name, core in cls._tensor_attrs.items():
        t, spec = tensors[name], specs[name]
        _expect(
            isinstance(spec, dict) and spec.get("shape") == list(t.shape),
            f"tensor {name!r} has the wrong shape",
        )
        _expect(
            t.ndim == len(batch_shape) + core, f"tensor {name!r} does not match batch_shape {batch_shape}"
        )
        _expect(
            list(t.shape[: len(batch_shape)]) == batch_shape, f"tensor {name!r} does not match batch_shape"
        )
        _expect(t.is_floating_point(), f"tensor {name!r} must be floating point")
    feature_dims = {tensors[name].shape[-1] for name, core in cls._tensor_attrs.items() if core == 1}
    _expect(len(feature_dims) <= 1, "tensors disagree on the feature dimension")
    probe._set_learned(dict(tensors), {k: v for k, v in meta.items() if k in cls._meta_attrs})
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

    Raises:
        FileNotFoundError: nothing at ``path``.
        ProbeFormatError: the files are corrupt, truncated, incomplete or inconsistent, or name a
            probe type that is not registered.
    """
    config_path, tensors_path = _paths(path)
    if not config_path.exists():
        raise FileNotFoundError(f"no probe at {path} (expected {config_path})")
    if not tensors_path.exists():
        raise ProbeFormatError(f"probe at {path} is incomplete: {tensors_path.name} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProbeFormatError(f"{config_path} is not valid JSON: {e}") from None
    try:
        tensors = load_file(str(tensors_path))
    except Exception as e:  # safetensors raises its own error types (and OSError) on corrupt files
        raise ProbeFormatError(f"{tensors_path} is not a valid safetensors file: {e}") from None
    return probe_from_state(config, tensors)
