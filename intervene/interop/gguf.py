"""llama.cpp control vectors (GGUF) <-> :class:`Steering` at block outputs.

The file format is the one repeng's ``ControlVector.export_gguf`` writes and llama.cpp's
``common_control_vector_load`` reads: ``general.architecture = "controlvector"``, string
``controlvector.model_hint`` (the HF ``model_type``), ``controlvector.layer_count`` (how many
directions the file holds, as repeng writes it; llama.cpp ignores both keys), and one 1-D F32
tensor ``direction.{N}`` per steered layer.

Layer convention (checked against both sources): ``direction.N`` is added to the output of
decoder block ``N`` counted from 0 — llama.cpp adds ``tensors[N]`` right after block ``N``'s final
residual add (``cur = build_cvec(cur, il)``), at every position, prompt included; repeng reads
``hidden_states[N + 1]`` (= block ``N``'s output) for ``direction.N``. So ``direction.N`` is our site
``layers.N`` (same number). llama.cpp rejects ``direction.0`` (its buffer has no slot for layer 0),
so the output of block 0 cannot be exported. Directions are stored already multiplied by the
steering scale; llama.cpp's ``--control-vector-scaled FILE S`` multiplies them by ``S`` again.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from intervene.errors import DiffFormatError, InterventionError
from intervene.intervenable import Intervenable
from intervene.methods.steering.intervention import Steering
from intervene.sites import hidden_size, num_layers

ARCH = "controlvector"
_BLOCK_OUT = re.compile(r"^layers\.(\d+)$")
_BLOCK_IN = re.compile(r"^layers\.(\d+):input$")


@dataclass
class ControlVector:
    """A control-vector file's contents: ``{block index N: direction [hidden]}`` and the model hint."""

    directions: dict[int, torch.Tensor]
    model_hint: str | None = None

    def to_steering(self, scale: float = 1.0, name: str = "control_vector") -> Steering:
        """``Steering`` adding ``scale · direction.N`` at ``layers.N`` (every position)."""
        return Steering({f"layers.{n}": d for n, d in sorted(self.directions.items())}, scale=scale,
                        positions="all", name=name)


def control_vector_of(ivm: Intervenable) -> ControlVector:
    """Sum ``ivm``'s steering at block outputs into one direction per layer (scale applied).

    ``layers.{N+1}:input`` counts as ``layers.N`` (the same residual point). Raises
    ``InterventionError`` for anything llama.cpp cannot express.
    """
    resolved = ivm.resolve()
    dirs: dict[int, torch.Tensor] = {}
    for iv in ivm.interventions:
        if iv.type_name != "steering":
            raise InterventionError(f"{iv.name} ({iv.type_name}): a control vector can only add vectors")
        if iv.positions.kind != "all":
            raise InterventionError(f"{iv.name}: llama.cpp applies control vectors at every position; "
                                    f"positions={iv.positions.to_json()!r} cannot be exported")
        for concrete in resolved[iv.name]:
            if (m := _BLOCK_OUT.match(concrete)) is not None:
                layer = int(m.group(1))
            elif (m := _BLOCK_IN.match(concrete)) is not None and int(m.group(1)) > 0:
                layer = int(m.group(1)) - 1
            else:
                raise InterventionError(f"{iv.name}: site {concrete!r} is not a block output; control vectors "
                                        "steer only the residual stream after a block (layers.N)")
            if layer == 0:
                raise InterventionError(f"{iv.name}: llama.cpp cannot steer the output of block 0 (it rejects "
                                        "direction.0); use layers.1 or later")
            v = iv._vec(concrete, torch.empty(0, dtype=torch.float32)).reshape(-1)  # noqa: SLF001
            dirs[layer] = dirs[layer] + v if layer in dirs else v.clone()
    return ControlVector(dirs, getattr(ivm.model.config, "model_type", None))


def export_control_vector(ivm: Intervenable, path: str | Path, model_hint: str | None = None) -> Path:
    """Write ``ivm``'s block-output steering as a llama.cpp control vector (GGUF, F32 directions).

    Use with ``llama-cli -m model.gguf --control-vector PATH``. Needs the ``gguf`` package.
    """
    import gguf
    import numpy as np

    cv = control_vector_of(ivm)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint or cv.model_hint or "unknown")
    writer.add_uint32(f"{ARCH}.layer_count", len(cv.directions))
    for n, d in sorted(cv.directions.items()):
        writer.add_tensor(f"direction.{n}", d.detach().cpu().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not len(field.parts):
        return None
    return bytes(field.parts[field.data[0]] if field.data else field.parts[-1]).decode("utf-8", errors="replace")


def read_control_vector(path: str | Path) -> ControlVector:
    """Parse a control-vector GGUF (repeng / llama.cpp ``cvector-generator`` files)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise DiffFormatError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _string_field(reader, "general.architecture")
    if arch is not None and arch != ARCH:
        raise DiffFormatError(f"{path} is a GGUF with architecture {arch!r}, not a control vector")
    dirs: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m is None:
            continue
        n = int(m.group(1))
        if n == 0:
            raise DiffFormatError(f"{path}: direction.0 is invalid (llama.cpp rejects it: layer 0 cannot be steered)")
        data = torch.from_numpy(t.data.copy()).float().reshape(-1)
        dirs[n] = dirs[n] + data if n in dirs else data  # llama.cpp sums repeated layers
    if not dirs:
        raise DiffFormatError(f"{path} holds no direction.N tensors")
    return ControlVector(dirs, _string_field(reader, f"{ARCH}.model_hint"))


def import_control_vector(path: str | Path, model: nn.Module | None = None, scale: float = 1.0,
                          name: str = "control_vector") -> Steering:
    """A :class:`Steering` equal to loading ``path`` in llama.cpp with strength ``scale``.

    With ``model``, checks the hidden size and layer range and warns on a different model hint.
    """
    cv = read_control_vector(path)
    if model is not None:
        h, n_layers = hidden_size(model), num_layers(model)
        bad = {n: d.numel() for n, d in cv.directions.items() if d.numel() != h}
        if bad:
            raise InterventionError(f"{path}: directions of width {sorted(set(bad.values()))} for a model of "
                                    f"hidden size {h}")
        if max(cv.directions) >= n_layers:
            raise InterventionError(f"{path}: direction.{max(cv.directions)} but the model has {n_layers} blocks")
        mtype = getattr(model.config, "model_type", None)
        if cv.model_hint and mtype and cv.model_hint != mtype:
            warnings.warn(f"{path} was made for {cv.model_hint!r}, the model is {mtype!r}", stacklevel=2)
    return cv.to_steering(scale=scale, name=name)
