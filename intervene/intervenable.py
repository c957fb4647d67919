"""``Intervenable``: a model plus interventions whose hooks live while it is attached.

>>> ivm = Intervenable(model, [Steering({"layers.6": v}, scale=4.0, positions="generated")])
>>> out = ivm.generate(**batch, max_new_tokens=64)   # what HF returns
>>> with ivm.disabled(): base = ivm(**batch)          # the base model, no edits
>>> ivm.detach()                                     # removes our hooks, and only ours

While attached, ``model.generate`` is routed through position tracking too, so code that calls
the model's own ``generate`` (pipelines, eval harnesses) is steered the same way.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from intervene.errors import InterventionError, PositionsError
from intervene.hooks import HookSet, add_call_hook, add_input_hook, add_output_hook
from intervene.intervention import Intervention, resolve
from intervene.positions import CallContext, GenerationState
from intervene.sites import Site

# One attached Intervenable per model: two would race on model.generate and on position state.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Intervenable] = weakref.WeakKeyDictionary()


def _past_length(named: dict[str, Any]) -> int:
    """Tokens already in the KV cache of this call (transformers 5 names it ``cache``, 4 ``past_key_values``)."""
    pos = named.get("cache_position")
    if isinstance(pos, torch.Tensor) and pos.numel():
        return int(pos.reshape(-1)[0])
    pkv = named.get("cache", named.get("past_key_values"))
    if pkv is None:
        return 0
    if hasattr(pkv, "get_seq_length"):
        return int(pkv.get_seq_length())
    try:  # legacy tuple-of-tuples cache: [layer][k/v] -> [batch, heads, seq, dim]
        return int(pkv[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class Intervenable:
    """A model with interventions attached as forward hooks (composed in the order given).

    Args:
        model: a HuggingFace ``PreTrainedModel`` (any dtype/device; never modified or moved).
        interventions: one or a list; names must be unique.
        attach: register the hooks now (default) or later with :meth:`attach`.
    """

    def __init__(self, model: nn.Module, interventions: Intervention | Sequence[Intervention] = (),
                 attach: bool = True) -> None:
        self.model = model
        self.interventions: list[Intervention] = (
            [interventions] if isinstance(interventions, Intervention) else list(interventions))
        names = [iv.name for iv in self.interventions]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise InterventionError(f"intervention names must be unique; repeated: {sorted(dup)} (pass name=...)")
        self._hooks = HookSet()
        self._enabled = True
        self._ctx: CallContext | None = None
        self._gen: GenerationState | None = None
        self._saved_generate: tuple[bool, Any] | None = None
        self.metadata: dict[str, Any] = {}
        if attach:
            self.attach()

    # ---- attach / detach -----------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return len(self._hooks) > 0

    def resolve(self) -> dict[str, dict[str, Site]]:
        """``{intervention name: {concrete site: Site}}``, binding (and so validating) each one."""
        return resolve(self.model, self.interventions)

    def attach(self) -> Intervenable:
        """Register our hooks (idempotent). Validates every site and shape first."""
        if self.attached:
            return self
        other = _ATTACHED.get(self.model)
        if other is not None and other is not self and other.attached:
            raise InterventionError("this model already has an attached Intervenable; detach it first, or put "
                                    "all interventions in one Intervenable (they compose in order)")
        resolved = self.resolve()
        groups: dict[tuple[str, str], tuple[Site, list[tuple[Intervention, str]]]] = {}
        for iv in self.interventions:
            for concrete, site in resolved[iv.name].items():
                key = (site.module_path, site.side)
                if key in groups and groups[key][0].heads != site.heads:
                    raise InterventionError(f"sites {groups[key][0].name!r} and {site.name!r} see the same "
                                            "module input with different views; use one of them")
                groups.setdefault(key, (site, []))[1].append((iv, concrete))
        try:
            add_call_hook(self._hooks, self.model, self._on_call)
            for (_, side), (site, entries) in groups.items():
                fn = self._make_edit(site, entries)
                add = add_input_hook if side == "input" else add_output_hook
                add(self._hooks, site.module, fn, site.name)
        except BaseException:
            self._hooks.remove()
            raise
        self._patch_generate()
        _ATTACHED[self.model] = self
        return self

    def detach(self) -> None:
        """Remove our hooks and restore ``model.generate``; other hooks on the model stay."""
        self._hooks.remove()
        self._restore_generate()
        self._ctx = None
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]

    def __enter__(self) -> Intervenable:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[Intervenable]:
        """Run the base model: hooks stay registered but edit nothing."""
        prev, self._enabled = self._enabled, False
        try:
            yield self
        finally:
            self._enabled = prev

    def __getitem__(self, name: str) -> Intervention:
        for iv in self.interventions:
            if iv.name == name:
                return iv
        raise KeyError(f"no intervention named {name!r}; have {[iv.name for iv in self.interventions]}")

    # ---- the hook engine -----------------------------------------------------------------------
    def _on_call(self, named: dict[str, Any]) -> None:
        x = named.get("input_ids")
        if x is None:
            x = named.get("inputs_embeds")
        if x is None or x.ndim < 2:
            self._ctx = None
            return
        self._ctx = CallContext(x.shape[0], x.shape[1], named.get("attention_mask"),
                                _past_length(named), self._gen)

    def _context_for(self, h: torch.Tensor) -> tuple[CallContext, torch.Tensor]:
        """The call's context and ``h`` viewed as ``[batch, seq, ...]``.

        Some modules see tokens flattened to ``[batch*seq, width]`` (OPT's MLP); they are viewed back.
        """
        ctx = self._ctx
        if ctx is not None:
            if h.ndim >= 3 and h.shape[0] == ctx.batch and h.shape[1] == ctx.seq:
                return ctx, h
            if h.ndim == 2 and h.shape[0] == ctx.batch * ctx.seq:
                return ctx, h.view(ctx.batch, ctx.seq, h.shape[1])
        if h.ndim < 3:
            raise PositionsError(f"an activation of shape {tuple(h.shape)} has no [batch, seq] axes")
        # The module ran outside a call of the wrapped model (e.g. a submodule called directly).
        return CallContext(h.shape[0], h.shape[1], None, 0, None), h

    def _make_edit(self, site: Site,
                   entries: list[tuple[Intervention, str]]) -> Callable[[torch.Tensor], torch.Tensor]:
        heads = site.heads

        def edit(h: torch.Tensor) -> torch.Tensor:
            if not self._enabled:
                return h
            try:
                ctx, h3 = self._context_for(h)
                x = h3.view(*h3.shape[:-1], *heads) if heads is not None else h3
                y = x
                for iv, concrete in entries:
                    y = iv.apply(concrete, y, ctx)
                return h if y is x else y.reshape(h.shape)
            except BaseException:
                # Leave the model clean: a failing edit must not keep editing later calls.
                self.detach()
                raise

        return edit

    # ---- calls ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _live(self) -> Iterator[None]:
        was = self.attached
        if not was:
            self.attach()
        try:
            yield
        except BaseException:
            self.detach()
            raise
        if not was:
            self.detach()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward pass of the model with the edits; returns what the model returns."""
        with self._live():
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with the edits; HF kwargs pass through, HF's return value comes back."""
        with self._live():
            generate: Any = self.model.generate  # attached now: this is _patch_generate's wrapper
            return generate(*args, **kwargs)

    def _patch_generate(self) -> None:
        model = self.model
        had = "generate" in model.__dict__
        inner: Any = model.generate
        self._saved_generate = (had, model.__dict__.get("generate"))

        def generate(*args: Any, **kwargs: Any) -> Any:
            x = kwargs.get("input_ids", kwargs.get("inputs"))
            if x is None:
                x = args[0] if args else kwargs.get("inputs_embeds")
            prev = self._gen
            self._gen = GenerationState(batch0=int(x.shape[0]) if x is not None else 1)
            try:
                return inner(*args, **kwargs)
            except BaseException:
                self.detach()
                raise
            finally:
                self._gen = prev

        generate.__intervene__ = self  # type: ignore[attr-defined]
        generate.__doc__ = inner.__doc__
        object.__setattr__(model, "generate", generate)

    def _restore_generate(self) -> None:
        if self._saved_generate is None:
            return
        had, prev = self._saved_generate
        cur = self.model.__dict__.get("generate")
        if cur is not None and getattr(cur, "__intervene__", None) is self:
            if had:
                object.__setattr__(self.model, "generate", prev)
            else:
                del self.model.__dict__["generate"]
        self._saved_generate = None

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, card: bool = True) -> Path:
        """Write the diff (``intervene_config.json`` + ``intervene_weights.safetensors`` + card)."""
        from intervene.diff_format import save_diff

        return save_diff(Path(save_directory), self.model, self.interventions, self.metadata, card=card)

    @classmethod
    def load(cls, repo_or_dir: str | Path, model: nn.Module, revision: str | None = None,
             token: str | bool | None = None, attach: bool = True) -> Intervenable:
        """Load a diff from a directory or a Hub repo onto ``model`` (validated before any hook)."""
        from intervene.diff_format import load_diff
        from intervene.hubio import resolve_diff_dir

        path = resolve_diff_dir(repo_or_dir, revision=revision, token=token)
        interventions, metadata = load_diff(path, model)
        ivm = cls(model, interventions, attach=False)
        ivm.metadata = metadata
        return ivm.attach() if attach else ivm

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the diff to a Hub repo as one commit (see :func:`intervene.hubio.push_diff`)."""
        from intervene.hubio import push_diff

        return push_diff(self.model, self.interventions, repo_id, metadata=self.metadata, **kwargs)

    def bake(self) -> nn.Module:
        """A plain ``PreTrainedModel`` with the edits in its weights (see :mod:`intervene.bake`)."""
        from intervene.bake import bake

        return bake(self.model, self.interventions)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Intervenable({type(self.model).__name__}, {self.interventions}, {state})"
