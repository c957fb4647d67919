"""Checkpoints for resuming a training run: safetensors + JSON, validated on load, never unpickled.

A checkpoint directory holds one sub-directory per saved step and a ``latest.json`` pointer, rewritten
atomically after the step's files are complete (a crash mid-write leaves the previous checkpoint in force)::

    ckpt/latest.json                 {"format": ..., "dir": "step-000120"}
    ckpt/step-000120/state.json      loop position, history, best score, config, names and shapes
    ckpt/step-000120/params.safetensors     the interventions' modules (parameters and buffers)
    ckpt/step-000120/best.safetensors       the best evaluation's modules
    ckpt/step-000120/optimizer.safetensors  AdamW's per-parameter state, keyed "{param}.{exp_avg|...}"
    ckpt/step-000120/rng.safetensors        the shuffling generator's state and this epoch's order

Loading checks the format, the version, the training config, the parameter names and shapes and the data
sizes against the run being resumed, and raises :class:`~intervene.errors.CheckpointError` naming what
differs before anything is restored.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from intervene.errors import CheckpointError
from intervene.fileio import atomic_write, atomic_write_bytes

FORMAT = "intervene-trainer-checkpoint"
VERSION = 1
FILES = ("state.json", "params.safetensors", "best.safetensors", "optimizer.safetensors", "rng.safetensors")


@dataclass
class LoopState:
    """Where the loop is: everything besides tensors that a resumed run needs to continue identically."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    micro: int = 0  # next micro-batch of the current epoch
    order: list[int] | None = None  # this epoch's shuffled order (None: draw at the next epoch start)
    best: float = float("inf")
    best_step: int = 0
    best_epoch: int = 0
    bad: int = 0  # evaluations since the best
    running_sum: float = 0.0  # training loss × examples since the last evaluation
    running_n: int = 0
    stopped: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "order"}
        d["best"] = None if d["best"] == float("inf") else d["best"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], order: list[int] | None) -> LoopState:
        d = dict(d)
        d["best"] = float("inf") if d.get("best") is None else float(d["best"])
        return cls(order=order, **d)


def _tensors(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{m}/{k}": v.detach().contiguous().cpu() for m, sd in state.items() for k, v in sd.items()}


def _save_st(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def save_checkpoint(directory: str | Path, *, loop: LoopState, config: dict[str, Any],
                    modules: dict[str, dict[str, torch.Tensor]], best: dict[str, dict[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, scheduler: Any, param_names: list[list[str]],
                    generator: torch.Generator, n_train: int, n_val: int, keep: int = 1) -> Path:
    """Write one checkpoint (see the module docstring); ``modules``/``best`` are ``{module name: state_dict}``,
    ``param_names`` the optimizer's parameters by group. Older step directories beyond ``keep`` are removed."""
    root = Path(directory)
    sub = root / f"step-{loop.step:06d}"
    if sub.exists():
        shutil.rmtree(sub)
    sub.mkdir(parents=True)
    opt_sd = optimizer.state_dict()
    flat = [n for group in param_names for n in group]
    opt_tensors, opt_scalars = {}, {}
    for idx, st in opt_sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                opt_tensors[f"{flat[idx]}/{k}"] = v.detach().contiguous().cpu()
            else:
                opt_scalars[f"{flat[idx]}/{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in opt_sd["param_groups"]]
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    shapes = {f"{m}/{k}": list(v.shape) for m, sd in modules.items() for k, v in sd.items()}
    state = {"format": FORMAT, "version": VERSION, "config": config, "n_train": n_train, "n_val": n_val,
             "loop": loop.to_json(), "shapes": shapes, "param_names": param_names, "optimizer_groups": groups,
             "optimizer_scalars": opt_scalars, "scheduler": sched}
    _save_st(sub / "params.safetensors", _tensors(modules))
    _save_st(sub / "best.safetensors", _tensors(best))
    _save_st(sub / "optimizer.safetensors", opt_tensors)
    rng = {"generator": generator.get_state()}
    if loop.order is not None:
        rng["order"] = torch.tensor(loop.order, dtype=torch.long)
    _save_st(sub / "rng.safetensors", rng)
    atomic_write_bytes(sub / "state.json", json.dumps(state, indent=1))
    atomic_write_bytes(root / "latest.json", json.dumps({"format": FORMAT, "dir": sub.name}))
    olds = sorted(p for p in root.glob("step-*") if p.is_dir() and p != sub)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return sub


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint to resume from."""
    return (Path(directory) / "latest.json").is_file()


@dataclass
class Checkpoint:
    """A loaded, validated checkpoint (tensors on the CPU)."""

    path: Path
    loop: LoopState
    modules: dict[str, dict[str, torch.Tensor]]
    best: dict[str, dict[str, torch.Tensor]]
    optimizer_state: dict[str, Any]
    scheduler: dict[str, Any]
    generator_state: torch.Tensor


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an intervene trainer checkpoint")
    return data


def _load_st(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _nest(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        m, _, k = key.partition("/")
        out.setdefault(m, {})[k] = v
    return out


def load_checkpoint(directory: str | Path, *, config: dict[str, Any], shapes: dict[str, list[int]],
                    param_names: list[list[str]], n_train: int, n_val: int) -> Checkpoint:
    """Read and validate the latest checkpoint in ``directory`` against the run being resumed.

    ``shapes`` are the current modules' tensors (``"{module}/{key}"`` → shape). Raises ``CheckpointError``
    naming every mismatch (config fields, tensors, optimizer parameters, data sizes).
    """
    root = Path(directory)
    pointer = _read_json(root / "latest.json")
    sub = root / str(pointer.get("dir", ""))
    if not sub.is_dir() or sub.parent != root:
        raise CheckpointError(f"{root}/latest.json points at {pointer.get('dir')!r}, which is not a step directory")
    state = _read_json(sub / "state.json")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{sub}: checkpoint version {state.get('version')!r}; this library reads {VERSION}")
    saved_cfg = state.get("config") or {}
    diff = sorted(k for k in set(saved_cfg) | set(config) if saved_cfg.get(k) != config.get(k))
    if diff:
        raise CheckpointError(f"{sub} was written with another training config; differing: "
                              + ", ".join(f"{k} ({saved_cfg.get(k)!r} there, {config.get(k)!r} now)" for k in diff))
    if (state.get("n_train"), state.get("n_val")) != (n_train, n_val):
        raise CheckpointError(f"{sub} was written for {state.get('n_train')} training / {state.get('n_val')} "
                              f"validation examples; this run has {n_train} / {n_val}")
    if state.get("shapes") != shapes:
        have, want = state.get("shapes") or {}, shapes
        bad = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise CheckpointError(f"{sub} holds other tensors than the interventions being trained: " + ", ".join(
            f"{k} ({have.get(k)} there, {want.get(k)} now)" for k in bad[:8]))
    if state.get("param_names") != param_names:
        raise CheckpointError(f"{sub}: optimizer parameters {state.get('param_names')} differ from {param_names}")
    params, best = _load_st(sub / "params.safetensors"), _load_st(sub / "best.safetensors")
    for name, flat in (("params", params), ("best", best)):
        got = {k: list(v.shape) for k, v in flat.items()}
        if got != shapes:
            raise CheckpointError(f"{sub}/{name}.safetensors does not match state.json's tensor list")
    opt_flat = _load_st(sub / "optimizer.safetensors")
    flat_names = [n for g in param_names for n in g]
    per: dict[int, dict[str, Any]] = {}
    for key, v in list(opt_flat.items()) + list((state.get("optimizer_scalars") or {}).items()):
        pname, _, k = key.rpartition("/")
        if pname not in flat_names:
            raise CheckpointError(f"{sub}: optimizer state for unknown parameter {pname!r}")
        per.setdefault(flat_names.index(pname), {})[k] = v
    groups, start = [], 0
    for g, names in zip(state.get("optimizer_groups") or [], param_names):
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        g["params"] = list(range(start, start + len(names)))
        start += len(names)
        groups.append(g)
    if len(groups) != len(param_names):
        raise CheckpointError(f"{sub}: {len(groups)} optimizer groups saved, {len(param_names)} expected")
    rng = _load_st(sub / "rng.safetensors")
    if "generator" not in rng:
        raise CheckpointError(f"{sub}/rng.safetensors lacks the generator state")
    order = rng["order"].tolist() if "order" in rng else None
    if order is not None and sorted(order) != list(range(n_train)):
        raise CheckpointError(f"{sub}: the saved epoch order is not a permutation of the {n_train} examples")
    try:
        loop = LoopState.from_json(state["loop"], order)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{sub}/state.json has a malformed loop state: {e}") from None
    return Checkpoint(sub, loop, _nest(params), _nest(best), {"state": per, "param_groups": groups},
                      dict(state.get("scheduler") or {}), rng["generator"])
