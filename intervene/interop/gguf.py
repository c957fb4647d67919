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
from typing import Any

import numpy as np
import torch
from torch import nn

from intervene.errors import DiffFormatError, InteropError, InterventionError
from intervene.intervenable import Intervenable
from intervene.methods.steering.intervention import Steering
from intervene.safeio import Root
from intervene.sites import hidden_size, num_layers
from intervene.tensorfile import check_tensor

ARCH = "controlvector"
MAX_BYTES = 1 << 30  # a control vector is layers x hidden floats: megabytes
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


def _field(reader: Any, key: str, kind: str, where: Path) -> Any:
    """A scalar KV field of type ``kind`` (``STRING`` / ``UINT32``), or ``None`` when absent."""
    import gguf

    field = reader.get_field(key)
    if field is None:
        return None
    want = getattr(gguf.GGUFValueType, kind)
    if list(field.types) != [want] or not field.data:
        raise DiffFormatError.at(where, key, f"a {kind.lower()} value", [t.name for t in field.types])
    part = field.parts[field.data[0]]
    if kind == "STRING":
        return bytes(part).decode("utf-8", errors="replace")
    return int(part[0])


def read_control_vector(path: str | Path) -> ControlVector:
    """Parse a control-vector GGUF (repeng / llama.cpp ``cvector-generator`` files), checked as llama.cpp would:
    ``general.architecture`` ``controlvector``, only ``direction.N`` tensors (``N >= 1``), each 1-D F32 with
    finite values and one width for all, ``layer_count`` (when present) equal to their number. The file is
    opened through :class:`~intervene.safeio.Root` (a regular file inside its folder: no FIFO, device or
    symlink leading elsewhere) and bounded in size before the ``gguf`` reader maps it."""
    import gguf

    path = Path(path)
    root = Root(path.parent, DiffFormatError)
    head = root.read_range(path.name, 0, min(4, root.size(path.name)))
    if bytes(head) != b"GGUF":
        raise DiffFormatError.at(path, "magic", "a GGUF file (it starts with b'GGUF')", bytes(head))
    with root.open_file(path.name, MAX_BYTES) as f:
        try:
            reader = gguf.GGUFReader(f)  # np.memmap accepts an open file: the one we checked
        except Exception as e:  # the gguf parser raises many kinds on a malformed file
            raise DiffFormatError.at(path, None, "a readable GGUF file",
                                     note=f"{type(e).__name__}: {str(e)[:200]}") from None
    arch = _field(reader, "general.architecture", "STRING", path)
    if arch is not None and arch != ARCH:
        raise DiffFormatError.at(path, "general.architecture", repr(ARCH), arch, note="not a control vector")
    dirs: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.([1-9][0-9]{0,5})", t.name)
        field = f"tensor {t.name!r}"
        if m is None:
            raise DiffFormatError.at(path, field, "only direction.N tensors with N >= 1 (llama.cpp rejects "
                                     "direction.0: layer 0 cannot be steered)", t.name)
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise DiffFormatError.at(path, field, "a 1-D F32 tensor", f"{t.tensor_type.name} {list(t.shape)}")
        data = torch.from_numpy(np.array(t.data, dtype=np.float32, copy=True)).reshape(-1)
        check_tensor(data, DiffFormatError, path, field)
        dirs[int(m.group(1))] = data
    if not dirs:
        raise DiffFormatError.at(path, "tensors", "at least one direction.N tensor")
    widths = sorted({d.numel() for d in dirs.values()})
    if len(widths) != 1 or widths[0] == 0:
        raise DiffFormatError.at(path, "tensors", "directions of one non-zero width", widths)
    count = _field(reader, f"{ARCH}.layer_count", "UINT32", path)
    if count is not None and count != len(dirs):
        raise DiffFormatError.at(path, f"{ARCH}.layer_count", f"the number of directions ({len(dirs)})", count)
    return ControlVector(dirs, _field(reader, f"{ARCH}.model_hint", "STRING", path))


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
            raise InteropError.at(path, "tensors", f"directions of the model's hidden size {h}",
                                  sorted(set(bad.values())))
        if max(cv.directions) >= n_layers:
            raise InteropError.at(path, f"tensor 'direction.{max(cv.directions)}'",
                                  f"a block of the model (it has {n_layers})", max(cv.directions))
        mtype = getattr(model.config, "model_type", None)
        if cv.model_hint and mtype and cv.model_hint != mtype:
            warnings.warn(f"{path} was made for {cv.model_hint!r}, the model is {mtype!r}", stacklevel=2)
    return cv.to_steering(scale=scale, name=name)
