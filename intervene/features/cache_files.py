"""Writing a latent cache's files: atomically, each recorded with its size and sha256 in the index."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from intervene.fileio import atomic_write_bytes


def save_recorded(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
          index: dict[str, Any] | None = None) -> None:
    """Write a safetensors file atomically; record its size and sha256 in ``index["files"]`` (relative name)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    atomic_write_bytes(path, data)
    if index is not None:
        rel = "/".join(path.parts[-3:]) if path.parent.parent.name == "shards" else path.name
        index.setdefault("files", {})[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json(path: Path, obj: dict[str, Any]) -> None:
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    atomic_write_bytes(path, text)


def progress_note(n_parts: int, next_batch: int) -> str:
    # one metadata key: safetensors writes several in a hash map's order, which would break byte-identical resumes
    return f"parts={n_parts} next_batch={next_batch}"
