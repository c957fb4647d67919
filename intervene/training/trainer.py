"""The shared training loop: any intervention whose parameters live in ``nn.Module`` attributes, trained
with a loss on the model's outputs while the model stays frozen.

>>> trainer = Trainer(model, [loreft], last_token_cross_entropy, TrainConfig(lr=4e-3, epochs=3),
...                   collate=lambda exs: pad_batch(exs, tok.pad_token_id))
>>> result = trainer.fit(examples)                     # a seeded validation split; early stopping on it
>>> result = trainer.fit(examples, checkpoint_dir="ckpt", checkpoint_every=50, resume=True)

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` examples (each a ``collate``d list of
examples) go through ``forward(ivm, batch)`` (default: the edited model on the batch) and
``loss(outputs, batch)``; their gradients, weighted by micro-batch size, sum to the gradient of the mean
over the step's examples. Then gradient clipping, AdamW, the learning-rate schedule, and each trained
intervention's ``invalidate()`` (cached casts and matrices) and ``on_train_step(step, total_steps)`` if it
has one (Boundless DAS anneals its temperature there).

The model is frozen twice over: its parameters' ``requires_grad`` flags are switched off for the run (and
restored after, whatever they were), which also spares autograd from keeping the activations that weight
gradients need; and gradients are taken with ``torch.autograd.grad`` with respect to the interventions'
parameters only, so nothing is ever accumulated on the model. A parameter shared with the model is refused.

Validation: the examples given as ``val``, else a seeded ``val_fraction`` split of the training data (with no
validation data, the running training loss is the criterion). It runs at the start (the untrained
intervention is a candidate), after every epoch or every ``eval_every`` steps; ``patience`` evaluations
without a lower loss stop the run, and the best parameters are restored at the end.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from intervene.errors import InterventionError
from intervene.hparams import as_dict
from intervene.intervenable import Intervenable
from intervene.intervention import Intervention
from intervene.training.batching import model_inputs
from intervene.training.checkpoint import LoopState, has_checkpoint, load_checkpoint, save_checkpoint
from intervene.training.config import TrainConfig, train_config
from intervene.training.losses import logits_of

Forward = Callable[[Intervenable, Any], Any]
LossFn = Callable[[Any, Any], torch.Tensor]
Groups = Callable[[dict[str, nn.Parameter]], list[dict[str, Any]]]


def default_forward(ivm: Intervenable, batch: Any) -> Any:
    """The edited model on a collated batch (no KV cache: training needs every position's graph)."""
    return ivm(**model_inputs(ivm.model, batch), use_cache=False)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)`` indices: a seeded permutation of ``range(n)``, ``round(n·val_fraction)`` (at least 1,
    at most ``n - 1``) held out; none when ``val_fraction`` is 0 or ``n < 2``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def trainable_modules(interventions: Sequence[Intervention]) -> dict[str, nn.Module]:
    """``{"{intervention}.{attribute}": module}`` for every ``nn.Module`` attribute of each intervention."""
    out: dict[str, nn.Module] = {}
    for iv in interventions:
        for attr, value in sorted(vars(iv).items()):
            if isinstance(value, nn.Module):
                out[f"{iv.name}.{attr}"] = value
    return out


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` on the model's parameters for a block, then restore every flag."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def lr_factor(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """The schedule as a factor of the peak rate at optimizer step ``s`` (HF's warm-up / decay formulas)."""
    warm = math.ceil(cfg.warmup * total)

    def factor(s: int) -> float:
        if s < warm:
            return s / max(1, warm)
        if cfg.schedule == "constant":
            return 1.0
        progress = (s - warm) / max(1, total - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


@dataclass
class TrainResult:
    """What a run did. ``history``: one entry per evaluation (``epoch``, ``step``, ``train_loss``, ``val_loss``)."""

    history: list[dict[str, float]]
    best_step: int
    best_epoch: int
    best_loss: float | None
    steps: int
    epochs_run: int
    n_train: int
    n_val: int
    stopped_early: bool
    examples_seen: int
    seconds: float


class Trainer:
    """Train the interventions' parameters through a frozen model (see the module docstring).

    Args:
        model: the model, or an ``Intervenable`` (then ``interventions`` defaults to its own).
        interventions: the interventions to attach and train (their ``nn.Module`` attributes hold the parameters).
        loss: ``loss(outputs, batch) -> scalar`` (see :mod:`intervene.training.losses`); a loss with
            ``needs_reference = True`` finds the unedited model's logits in ``batch["reference_logits"]``.
        config: a :class:`TrainConfig` (or a method's config subclassing it).
        forward: ``forward(ivm, batch) -> outputs`` (default :func:`default_forward`).
        collate: turns a list of examples into a batch (default: the list itself).
        param_groups: ``fn({name: parameter}) -> [{"params": [names], **optimizer options}]`` (e.g. a larger
            learning rate for one parameter); default one group.
        callbacks: ``fn(step, total_steps)`` called after each optimizer step.
    """

    def __init__(self, model: nn.Module | Intervenable, interventions: Sequence[Intervention] | None, loss: LossFn,
                 config: Any = None, *, forward: Forward | None = None,
                 collate: Callable[[list[Any]], Any] | None = None, param_groups: Groups | None = None,
                 progress: bool = True, desc: str = "train",
                 callbacks: Sequence[Callable[[int, int], None]] = ()) -> None:
        self.ivm = model if isinstance(model, Intervenable) else Intervenable(model, interventions or [], attach=False)
        self.interventions = list(interventions) if interventions is not None else list(self.ivm.interventions)
        if isinstance(model, Intervenable):
            missing = [iv.name for iv in self.interventions if iv not in self.ivm.interventions]
            if missing:
                raise InterventionError(f"interventions {missing} are not in the Intervenable being trained")
        self.model = self.ivm.model
        self.loss, self.cfg = loss, train_config(config if config is not None else TrainConfig())
        self.config_record = as_dict(config if config is not None else self.cfg)
        self.forward = forward or default_forward
        self.collate = collate or (lambda examples: examples)
        self.progress, self.desc, self.callbacks = progress, desc, list(callbacks)
        self.modules = trainable_modules(self.interventions)
        self.named = {f"{m}.{n}": p for m, mod in self.modules.items() for n, p in mod.named_parameters()
                      if p.requires_grad}
        if not self.named:
            raise InterventionError("nothing to train: the interventions hold no nn.Module with trainable parameters")
        shared = {id(p) for p in self.model.parameters()} & {id(p) for p in self.named.values()}
        if shared:
            raise InterventionError("an intervention shares parameters with the model; the model must stay frozen")
        groups = param_groups(self.named) if param_groups else [{"params": list(self.named)}]
        self.param_names = [list(g["params"]) for g in groups]
        self.params = [self.named[n] for names in self.param_names for n in names]
        self.optimizer = torch.optim.AdamW(
            [{**g, "params": [self.named[n] for n in g["params"]]} for g in groups],
            lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    # ---- evaluation ----------------------------------------------------------------------------
    def _run(self, batch: Any) -> torch.Tensor:
        out = self.forward(self.ivm, batch)
        if getattr(self.loss, "needs_reference", False):
            with torch.no_grad(), self.ivm.disabled():
                ref = self.forward(self.ivm, batch)
            batch = {**batch, "reference_logits": logits_of(ref).detach()}
        return self.loss(out, batch)

    @contextlib.contextmanager
    def _attached(self) -> Iterator[None]:
        """The hooks attached for a block; an Intervenable that was attached before stays attached."""
        was = self.ivm.attached
        self.ivm.attach()
        try:
            yield
        finally:
            if not was:
                self.ivm.detach()

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Any]) -> float:
        """Mean loss over ``examples`` (batches of ``batch_size``, weighted by size)."""
        total, bs = 0.0, self.cfg.batch_size
        with self._attached():
            for s in range(0, len(examples), bs):
                chunk = list(examples[s:s + bs])
                total += float(self._run(self.collate(chunk))) * len(chunk)
        return total / max(1, len(examples))

    def _state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {m: copy.deepcopy(mod.state_dict()) for m, mod in self.modules.items()}

    def _load_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for m, mod in self.modules.items():
            mod.load_state_dict(state[m])
        for iv in self.interventions:
            iv.invalidate()

    def _record(self, loop: LoopState, train: Sequence[Any], val: Sequence[Any], train_loss: float | None) -> None:
        """One evaluation: history entry, best-so-far, early-stopping count."""
        val_loss = self.evaluate(val) if val else float("nan")
        if train_loss is None:  # the start: no running loss yet
            train_loss = self.evaluate(train)
        score = val_loss if val else train_loss
        loop.history.append({"epoch": loop.epoch, "step": loop.step, "train_loss": train_loss, "val_loss": val_loss})
        if score < loop.best:
            loop.best, loop.best_step, loop.best_epoch, loop.bad = score, loop.step, loop.epoch, 0
            self._best = self._state()
        else:
            loop.bad += 1
            if self.cfg.patience is not None and loop.bad >= self.cfg.patience:
                loop.stopped = True
        loop.running_sum, loop.running_n = 0.0, 0

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, train: Sequence[Any], val: Sequence[Any] | None = None, *, checkpoint_dir: str | Path | None = None,
            checkpoint_every: int = 0, resume: bool = False) -> TrainResult:
        """Train on ``train`` (validating on ``val`` or a split of ``train``); returns a :class:`TrainResult`.

        With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` optimizer steps (0: at
        every evaluation) and at the end; ``resume=True`` continues from the latest one there (validated
        against this run) and ends exactly where the uninterrupted run would have.
        """
        cfg, t0 = self.cfg, time.perf_counter()
        train = list(train)
        if val is None:
            tr, va = split_indices(len(train), cfg.val_fraction, cfg.seed)
            train, val = [train[i] for i in tr], [train[i] for i in va]
        val = list(val)
        if not train:
            raise InterventionError("no training examples")
        n_micro = math.ceil(len(train) / cfg.batch_size)
        per_epoch = math.ceil(n_micro / cfg.grad_accum)
        total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, total))
        gen = torch.Generator().manual_seed(cfg.seed)
        self._best, self._saved_at = self._state(), -1
        resumed = bool(resume and checkpoint_dir is not None and has_checkpoint(checkpoint_dir))
        loop = self._resume(checkpoint_dir, scheduler, gen, len(train), len(val)) if resumed else LoopState()
        seen = 0
        with frozen(self.model), self._attached(), self._training_mode():
            if not resumed and cfg.eval_at_start:
                self._record(loop, train, val, None)
                loop.stopped = False  # the start never counts against patience
                loop.bad = 0
            bar = tqdm(total=cfg.epochs * n_micro, initial=loop.epoch * n_micro + loop.micro, desc=self.desc,
                       disable=not self.progress)
            while loop.epoch < cfg.epochs and not loop.stopped and loop.step < total:
                if loop.order is None:
                    loop.order, loop.micro = torch.randperm(len(train), generator=gen).tolist(), 0
                chunks = [loop.order[s:s + cfg.batch_size] for s in range(0, len(train), cfg.batch_size)]
                while loop.micro < len(chunks) and not loop.stopped and loop.step < total:
                    group = chunks[loop.micro:loop.micro + cfg.grad_accum]
                    seen += self._step(group, train, loop, scheduler, total, bar)
                    loop.micro += len(group)
                    if cfg.eval_every and loop.step % cfg.eval_every == 0 and loop.micro < len(chunks):
                        self._record(loop, train, val, loop.running_sum / max(1, loop.running_n))
                    self._maybe_save(checkpoint_dir, checkpoint_every, loop, scheduler, gen, train, val, mid=True)
                    for cb in self.callbacks:
                        cb(loop.step, total)
                if loop.micro >= len(chunks):  # the epoch is complete (not cut by max_steps or early stopping)
                    loop.epoch, loop.order = loop.epoch + 1, None
                    if not loop.stopped:
                        self._record(loop, train, val, loop.running_sum / max(1, loop.running_n))
                    self._maybe_save(checkpoint_dir, checkpoint_every, loop, scheduler, gen, train, val, mid=False)
            bar.close()
            if loop.step >= total and loop.order is not None and not loop.stopped and loop.running_n:
                self._record(loop, train, val, loop.running_sum / loop.running_n)  # cut mid-epoch by max_steps
            if checkpoint_dir is not None and self._saved_at != loop.step:
                self._save(checkpoint_dir, loop, scheduler, gen, train, val)
        if cfg.restore_best:
            self._load_state(self._best)
        for iv in self.interventions:
            iv.invalidate()
        best = None if loop.best == float("inf") else loop.best
        return TrainResult(loop.history, loop.best_step, loop.best_epoch, best, loop.step, loop.epoch, len(train),
                           len(val), loop.stopped, seen, time.perf_counter() - t0)

    @contextlib.contextmanager
    def _training_mode(self) -> Iterator[None]:
        for mod in self.modules.values():
            mod.train()
        try:
            yield
        finally:
            for mod in self.modules.values():
                mod.eval()

    def _step(self, group: list[list[int]], train: list[Any], loop: LoopState, scheduler: Any, total: int,
              bar: Any) -> int:
        """One optimizer step over the micro-batches of ``group``; returns the examples it saw."""
        n = sum(len(c) for c in group)
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        for chunk in group:
            loss = self._run(self.collate([train[i] for i in chunk]))
            loop.running_sum += float(loss.detach()) * len(chunk)
            loop.running_n += len(chunk)
            if loss.requires_grad:
                scaled = loss if len(chunk) == n else loss * (len(chunk) / n)
                got = torch.autograd.grad(scaled, self.params, allow_unused=True)
                grads = [g if a is None else (a if g is None else a + g) for a, g in zip(grads, got)]
            bar.update(1)
            bar.set_postfix(epoch=loop.epoch + 1, loss=f"{float(loss.detach()):.4f}")
        if all(g is None for g in grads):
            return n  # nothing edited anything (e.g. no position matched): no step
        for p, g in zip(self.params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loop.step += 1
        for iv in self.interventions:
            iv.invalidate()
            hook = getattr(iv, "on_train_step", None)
            if hook is not None:
                hook(loop.step, total)
        return n

    # ---- checkpoints ---------------------------------------------------------------------------
    def _maybe_save(self, directory: str | Path | None, every: int, loop: LoopState, scheduler: Any,
                    gen: torch.Generator, train: list[Any], val: list[Any], mid: bool) -> None:
        if directory is None:
            return
        if (every and mid and loop.step and loop.step % every == 0) or (not every and not mid):
            self._save(directory, loop, scheduler, gen, train, val)

    def _save(self, directory: str | Path, loop: LoopState, scheduler: Any, gen: torch.Generator,
              train: list[Any], val: list[Any]) -> None:
        save_checkpoint(directory, loop=loop, config=self.config_record, modules=self._state(), best=self._best,
                        optimizer=self.optimizer, scheduler=scheduler, param_names=self.param_names,
                        generator=gen, n_train=len(train), n_val=len(val))
        self._saved_at = loop.step

    def _resume(self, directory: str | Path | None, scheduler: Any, gen: torch.Generator, n_train: int,
                n_val: int) -> LoopState:
        assert directory is not None
        shapes = {f"{m}/{k}": list(v.shape) for m, mod in self.modules.items() for k, v in mod.state_dict().items()}
        ck = load_checkpoint(directory, config=self.config_record, shapes=shapes, param_names=self.param_names,
                             n_train=n_train, n_val=n_val)
        self._load_state(ck.modules)
        self._best = ck.best
        self.optimizer.load_state_dict(ck.optimizer_state)
        sd = scheduler.state_dict()
        sd.update(ck.scheduler)
        scheduler.load_state_dict(sd)
        gen.set_state(ck.generator_state)
        self._saved_at = ck.loop.step
        return ck.loop
