"""The peer libraries the interop tests compare against (SAELens, sparsify, delphi).

CI installs them (``.ci/run``), so there a missing peer is an error; a developer without them skips those tests.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

import pytest


def need(module: str) -> Any:
    """Import a peer: required under CI, skipped otherwise."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def delphi_without_vllm() -> None:
    """delphi imports vllm (a GPU inference server) at import time for its offline client; the scorers and the
    cache loader never call it. Installed with ``--no-deps``, delphi gets empty stand-ins for those imports, so
    its own scorer and loader code runs with our test clients. Nothing of vllm is ever executed."""
    need("delphi")
    for name in ("vllm", "vllm.distributed", "vllm.distributed.parallel_state", "vllm.inputs"):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.__path__ = []  # a package, so submodules can be registered under it
            for attr in ("LLM", "SamplingParams", "TokensPrompt", "destroy_model_parallel",
                         "destroy_distributed_environment"):
                setattr(mod, attr, type(attr, (), {}))
            sys.modules[name] = mod
