"""Register and remove forward (pre-)hooks. We only ever remove the handles we created.

Accelerate's offload hooks (which wrap ``module.forward``) and a user's own hooks are left alone
and keep running: a :class:`HookSet` holds exactly our ``RemovableHandle`` objects.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from intervene.errors import SiteError

# fn(activation) -> new activation (or the same object to leave it unchanged)
EditFn = Callable[[torch.Tensor], torch.Tensor]


class HookSet:
    """The handles one owner registered; ``remove()`` removes those and nothing else."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def _replace_first(value: Any, fn: EditFn, where: str) -> Any:
    """Apply ``fn`` to a tensor, or to the first element of a tuple/list (block outputs vary by version)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        new = fn(value[0])
        if new is value[0]:
            return value
        return type(value)((new, *value[1:]))
    raise SiteError(f"{where}: expected a tensor or a tuple starting with one, got {type(value).__name__}")


def add_output_hook(hooks: HookSet, module: nn.Module, fn: EditFn, where: str) -> None:
    """Edit ``module``'s output (a tensor or the first element of a tuple)."""

    def hook(_mod: nn.Module, _args: Any, output: Any) -> Any:
        new = _replace_first(output, fn, where)
        return None if new is output else new

    hooks.add(module.register_forward_hook(hook))


def add_input_hook(hooks: HookSet, module: nn.Module, fn: EditFn, where: str) -> None:
    """Edit ``module``'s first input (positional, or the ``hidden_states`` keyword)."""

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            new = _replace_first(args[0], fn, where)
            return None if new is args[0] else ((new, *args[1:]), kwargs)
        if "hidden_states" in kwargs:
            new = fn(kwargs["hidden_states"])
            return None if new is kwargs["hidden_states"] else (args, {**kwargs, "hidden_states": new})
        raise SiteError(f"{where}: the module was called without a positional input or hidden_states")

    hooks.add(module.register_forward_pre_hook(hook, with_kwargs=True))


def add_call_hook(hooks: HookSet, model: nn.Module, fn: Callable[[dict[str, Any]], None]) -> None:
    """Call ``fn(named_inputs)`` before every forward of ``model`` (positional args are named)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = ["input_ids"]

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        named = dict(zip(params, args)) if args else {}
        named.update(kwargs)
        fn(named)

    # prepend: our bookkeeping must see the call before any other pre-hook rewrites it
    hooks.add(model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))


def count_hooks(model: nn.Module) -> int:
    """Total forward and pre-forward hooks on every module of ``model`` (ours and others')."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
