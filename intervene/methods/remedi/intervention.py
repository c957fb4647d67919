"""REMEDI: learned representation editors (Hernandez, Li & Andreas, 2023).

A sample says *what* to edit: an ``entity`` mentioned in a ``prompt``, and a ``context`` sentence stating a
new ``attribute`` of it ("Zorvath lives in Tokyo."). The editor maps the attribute's representation to a
direction and adds it to the entity's representation:

* attribute encoding ``h_attr``: run the LM on the context alone; mean of the block-L output over the
  attribute's tokens (located by character offsets, so a *fast* tokenizer is required);
* entity encoding ``h_ent`` (only with ``use_entity``): block-L output at the last token of the entity
  run alone;
* editor ``d = W·h_attr + b`` (``W·[h_ent; h_attr] + b`` with ``use_entity``), full (``W`` hidden×in) or
  low rank (``W = U·V``, rank ``r``);
* edit: at ``layers.{L}`` (the block's output; ``side="input"`` for ``layers.{L}:input``, e.g. the
  embeddings for ``L = 0``), at the last token of the entity's last occurrence in the prompt:
  ``h <- h + alpha·d``. Attributes and entities are encoded at the same site.

The edit is per example, so it is per-call state. Either let :meth:`Remedi.edit` tokenize the prompts and
compute the directions::

    ivm = Intervenable(model, [editor])
    with editor.edit(ivm, tok, prompts, entities, contexts, attributes) as batch:
        out = ivm(**batch)                                  # edited forward
        gen = ivm.generate(**batch, max_new_tokens=20)      # edited generation

or set precomputed directions ``[n, hidden]`` and entity positions yourself with :meth:`Remedi.set_edit`.
Positions are indices into each row's own tokens (left padding excluded), resolved through
:mod:`intervene.positions`, so an edit is identical with and without the KV cache, and rows expanded by
beams / ``num_return_sequences`` use their example's direction. The edit depends on the input, so
REMEDI cannot be baked into weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from intervene.errors import InterventionError
from intervene.hparams import as_dict, make_config
from intervene.intervention import Intervention
from intervene.methods.remedi.config import RemediConfig
from intervene.methods.remedi.states import (
    attribute_states,
    entity_states,
    find_token_span,
    layer_means,
    left_pad,
    model_device,
    pad_id_of,
    prompt_entity_tokens,
    tokenize_with_span,
    unwrap,
)
from intervene.positions import CallContext, Positions, at_positions
from intervene.schemas.base import Index, JSONObject, PosInt, Strict, Width, validate
from intervene.sites import Site, hidden_size
from intervene.tensorfile import check_tensor

if TYPE_CHECKING:
    from intervene.intervenable import Intervenable

__all__ = ["Remedi", "RemediEditor", "attribute_states", "entity_states", "find_token_span", "layer_means",
           "left_pad", "prompt_entity_tokens", "tokenize_with_span"]


class RemediParams(Strict):
    """``params`` of a saved ``remedi`` intervention."""

    layer: Index
    side: Literal["output", "input"] = "output"
    hidden_size: Width
    rank: PosInt | None = None
    alpha: float = 1.0
    use_entity: bool = False
    config: JSONObject = {}


class RemediEditor(nn.Module):
    """``d = W·x + b`` with ``x = h_attr`` or ``[h_ent; h_attr]``; full-rank or ``W = up·down``.

    Inputs are standardized and the output rescaled with fixed statistics of the training states
    (``d = s_out·(W·(h − μ)/s + b)``: a mean vector and scalar RMS scales, set by :meth:`set_input_stats`
    and saved as buffers). The map stays affine in ``h``, but AdamW's steps become relative to the
    model's own activation scale (which varies by orders of magnitude across families and layers) and
    ignore its large shared mean direction. Full rank starts at zero, so the untrained editor is a no-op edit; low
    rank starts LoRA-style (random ``down``, zero ``up``): a product of two zero matrices has no gradient.
    """

    def __init__(self, hidden: int, rank: int | None = None, use_entity: bool = False) -> None:
        super().__init__()
        if rank is not None and not 0 < rank:
            raise InterventionError(f"REMEDI rank must be a positive integer or None, got {rank}")
        self.hidden, self.rank, self.use_entity = int(hidden), rank, bool(use_entity)
        self.register_buffer("attr_mean", torch.zeros(self.hidden))
        self.register_buffer("attr_scale", torch.ones(1))
        self.register_buffer("out_scale", torch.ones(1))
        if use_entity:
            self.register_buffer("entity_mean", torch.zeros(self.hidden))
            self.register_buffer("entity_scale", torch.ones(1))
        in_features = self.hidden * (2 if use_entity else 1)
        if rank is None:
            self.proj = nn.Linear(in_features, self.hidden)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            # One bias is enough: a bias on `down` would only add up·b1 to the output bias.
            self.down = nn.Linear(in_features, rank, bias=False)
            self.up = nn.Linear(rank, self.hidden)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    @torch.no_grad()
    def set_input_stats(self, attribute: torch.Tensor, entity: torch.Tensor | None = None) -> None:
        """Standardize inputs with the mean ``[hidden]`` and RMS scale of these states ``[n, hidden]``; scale
        outputs by the attribute states' per-dimension RMS (the size of a hidden state at this layer)."""
        pairs = [(attribute, self.attr_mean, self.attr_scale)]
        if self.use_entity and entity is not None:
            pairs.append((entity, self.entity_mean, self.entity_scale))
        for x, mean, scale in pairs:
            x = x.to(mean.device, mean.dtype)
            mu = x.mean(0)
            rms = (x - mu).pow(2).mean().sqrt() if x.shape[0] > 1 else x.pow(2).mean().sqrt()
            mean.copy_(mu if x.shape[0] > 1 else torch.zeros_like(mu))
            scale.fill_(float(rms) if float(rms) > 0 else 1.0)
        out = float(attribute.float().pow(2).mean().sqrt())
        self.out_scale.fill_(out if out > 0 else 1.0)

    def forward(self, attribute: torch.Tensor, entity: torch.Tensor | None = None) -> torch.Tensor:
        """Directions ``[n, hidden]`` from attribute states ``[n, hidden]`` (and entity states ``[n, hidden]``)."""
        x = (attribute - self.attr_mean) / self.attr_scale
        if self.use_entity:
            if entity is None:
                raise InterventionError("this REMEDI editor was built with use_entity=True: pass entity states")
            x = torch.cat([(entity - self.entity_mean) / self.entity_scale, x], dim=-1)
        return self.out_scale * (self.proj(x) if self.rank is None else self.up(self.down(x)))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape, as :meth:`state_dict` would hold them."""
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    @staticmethod
    def expected_shapes(hidden: int, rank: int | None, use_entity: bool) -> dict[str, tuple[int, ...]]:
        """:meth:`shapes` of an editor with these settings, computed without building it (a loader must not
        allocate what a file merely declares)."""
        out: dict[str, tuple[int, ...]] = {"attr_mean": (hidden,), "attr_scale": (1,), "out_scale": (1,)}
        if use_entity:
            out |= {"entity_mean": (hidden,), "entity_scale": (1,)}
        width = hidden * (2 if use_entity else 1)
        if rank is None:
            out |= {"proj.weight": (hidden, width), "proj.bias": (hidden,)}
        else:
            out |= {"down.weight": (rank, width), "up.weight": (hidden, rank), "up.bias": (hidden,)}
        return out


@dataclass(frozen=True)
class _EditState:
    directions: torch.Tensor  # [n_examples, hidden]; may carry grad while training
    positions: Positions  # per-example own-token indices of the entity's last token
    prompt_only: bool = False  # every position lies in the prompt: cached decode steps need no work


class Remedi(Intervention):
    """A REMEDI editor as an intervention at ``layers.{layer}`` (or its input; see the module docstring).

    Build one with :meth:`fit`; load one with ``Intervenable.load``. Fitted attributes: ``history_``
    (per-epoch losses), ``best_epoch_``, ``n_train_``, ``n_val_``.

    Args:
        layer: the block whose output is edited (and whose outputs encode attributes / entities).
        side: ``"output"`` (``layers.{layer}``) or ``"input"`` (``layers.{layer}:input``; the embeddings
            for layer 0, where small models read an entity's facts).
        hidden_size: the model's hidden width.
        rank: ``None`` for a full hidden×hidden map, else the rank of ``W``.
        alpha: edit strength (``h + alpha·d``); may be changed after fitting.
        use_entity: feed the entity's representation to the editor as well.
        editor: a :class:`RemediEditor` to use (a fresh, zero editor otherwise).
        config: loss and training settings, stored with the diff so a fit is reproducible.
    """

    def __init__(self, layer: int, hidden_size: int, rank: int | None = None, alpha: float = 1.0,
                 use_entity: bool = False, editor: RemediEditor | None = None, name: str | None = None,
                 config: Mapping[str, Any] | None = None, side: str = "output") -> None:
        if side not in ("output", "input"):
            raise InterventionError(f"REMEDI side must be 'output' or 'input', got {side!r}")
        self.layer, self.side = int(layer), side
        self.site = f"layers.{self.layer}" + (":input" if side == "input" else "")
        # "prompt": nominal (saved); the per-call state picks the one entity token each row edits.
        super().__init__(self.site, positions="prompt", name=name)
        self.hidden_size = int(hidden_size)
        self.alpha = float(alpha)
        if self.layer < 0 or self.hidden_size <= 0 or not math.isfinite(self.alpha):
            raise InterventionError(f"REMEDI needs layer >= 0, hidden_size > 0 and a finite alpha; got {layer}, "
                                    f"{hidden_size}, {alpha}")
        if editor is None:
            editor = RemediEditor(self.hidden_size, rank, use_entity)
        else:  # rank / use_entity may be left at their defaults: the editor knows them
            given = (rank, use_entity)
            if editor.hidden != self.hidden_size or given not in ((None, False), (editor.rank, editor.use_entity)):
                raise InterventionError("the editor's hidden size / rank / use_entity disagree with the arguments")
        self.editor = editor
        self.config: dict[str, Any] = dict(config or {})
        self._state: _EditState | None = None

    @property
    def rank(self) -> int | None:
        return self.editor.rank

    @property
    def use_entity(self) -> bool:
        return self.editor.use_entity

    # ---- the hook ------------------------------------------------------------------------------
    def apply(self, site: str, h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        st = self._state
        if st is None or self.alpha == 0.0 or (st.prompt_only and getattr(ctx, "decode_step", False)):
            return h
        m = ctx.mask(st.positions, h.device)
        if m is False:
            return h
        d = st.directions.to(device=h.device, dtype=h.dtype)[ctx.example_index().to(h.device)]  # [batch, hidden]
        new = h + self.alpha * d[:, None, :]
        return at_positions(m, new, h)

    # ---- per-call edits ------------------------------------------------------------------------
    def set_edit(self, directions: torch.Tensor, entity_positions: Sequence[int | Sequence[int]],
                 prompt_only: bool = False) -> None:
        """Edit the next calls: row ``i`` gets ``alpha·directions[i]`` at ``entity_positions[i]``.

        Args:
            directions: ``[n_examples, hidden]``.
            entity_positions: per example, an own-token index (left padding excluded; negative counts
                back from the end of the prompt), a list of them, or ``[]`` for no edit in that row.
            prompt_only: promise that every position is inside its row's prompt (entity tokens are), so
                the cached decode steps of ``generate`` skip the edit without any tensor work.
        """
        if directions.ndim != 2 or directions.shape[-1] != self.hidden_size:
            raise InterventionError(f"directions must be [n, {self.hidden_size}], got {tuple(directions.shape)}")
        rows = [tuple(p) if isinstance(p, (list, tuple)) else (int(p),) for p in entity_positions]
        if len(rows) != directions.shape[0]:
            raise InterventionError(f"{directions.shape[0]} directions but {len(rows)} position rows")
        self._state = _EditState(directions, Positions("per_example", tuple(rows)), bool(prompt_only))

    def clear_edit(self) -> None:
        """Stop editing (calls run unedited until the next :meth:`set_edit`)."""
        self._state = None

    @property
    def editing(self) -> bool:
        return self._state is not None

    @contextlib.contextmanager
    def editing_with(self, directions: torch.Tensor, entity_positions: Sequence[int | Sequence[int]],
                     prompt_only: bool = False) -> Iterator[Remedi]:
        """:meth:`set_edit` for the duration of a ``with`` block (the previous state comes back after)."""
        prev = self._state
        self.set_edit(directions, entity_positions, prompt_only)
        try:
            yield self
        finally:
            self._state = prev

    def directions(self, model: nn.Module | Intervenable, tok: Any, contexts: Sequence[str],
                   attributes: Sequence[str], entities: Sequence[str] | None = None,
                   batch_size: int = 32) -> torch.Tensor:
        """Edit directions ``[n, hidden]`` (float32, no grad) for contexts stating ``attributes``."""
        base = unwrap(model)
        h_attr = attribute_states(base, tok, self.site, contexts, attributes, batch_size)
        h_ent = None
        if self.use_entity:
            if entities is None:
                raise InterventionError("this editor uses the entity: pass entities=...")
            h_ent = entity_states(base, tok, self.site, entities, batch_size)
        p = next(self.editor.parameters())
        with torch.no_grad():
            return self.editor(h_attr.to(p.device, p.dtype), None if h_ent is None else h_ent.to(p.device, p.dtype))

    @contextlib.contextmanager
    def edit(self, model: nn.Module | Intervenable, tok: Any, prompts: Sequence[str], entities: Sequence[str],
             contexts: Sequence[str], attributes: Sequence[str], batch_size: int = 32
             ) -> Iterator[dict[str, torch.Tensor]]:
        """Tokenize ``prompts`` (left padded) and edit each at its entity; yields the model inputs.

        ``with editor.edit(ivm, tok, prompts, entities, contexts, attributes) as batch: ivm(**batch)``.
        ``batch`` holds ``input_ids`` / ``attention_mask`` ``[n, T]`` on the model's device. Every prompt
        must mention its entity (the last occurrence is edited).
        """
        n = len(prompts)
        if not (len(entities) == len(contexts) == len(attributes) == n):
            raise InterventionError("prompts, entities, contexts and attributes must have the same length")
        base = unwrap(model)
        seqs, pos = prompt_entity_tokens(tok, prompts, entities)
        d = self.directions(base, tok, contexts, attributes, entities, batch_size)
        ids, mask = left_pad(seqs, pad_id_of(tok), model_device(base))
        with self.editing_with(d, pos, prompt_only=True):
            yield {"input_ids": ids, "attention_mask": mask}

    def edit_samples(self, model: nn.Module | Intervenable, tok: Any, samples: Sequence[Mapping[str, Any]],
                     batch_size: int = 32) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
        """:meth:`edit` over samples with ``prompt``, ``entity``, ``context`` and ``attribute`` keys."""
        return self.edit(model, tok, [s["prompt"] for s in samples], [s["entity"] for s in samples],
                         [s["context"] for s in samples], [s["attribute"] for s in samples], batch_size)

    # ---- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(cls, model: nn.Module, tok: Any, samples: Sequence[Mapping[str, Any]], layer: int,
            config: RemediConfig | None = None, *, name: str | None = None, progress: bool = True,
            encode_batch_size: int = 32, **hyperparameters: Any) -> Remedi:
        """Train an editor at ``layers.{layer}`` (or its input) on ``samples`` with the LM frozen.

        Args:
            model: a causal LM; never modified (no gradient is stored on it). Put it in eval mode.
            tok: its *fast* tokenizer (character offsets locate the entity and attribute tokens).
            samples: dicts with ``entity``, ``context``, ``attribute``, ``prompt``, ``target_new`` and
                optionally ``target_true``.
            config: a :class:`RemediConfig`; keyword ``hyperparameters`` (``lr=3e-3, side="input"``)
                override its fields (or the defaults).
            progress: show a progress bar with the loss.

        Returns a fitted :class:`Remedi` with ``history_`` (per epoch: ``train_loss``, ``val_loss``),
        ``best_epoch_`` (0 = the untrained editor), ``n_train_``, ``n_val_``; the loss and the loop are
        documented in :mod:`intervene.methods.remedi.train`.
        """
        from intervene.methods.remedi.train import check_fit_inputs, train_editor

        cfg = make_config(RemediConfig, config, **hyperparameters)
        check_fit_inputs(model, samples)
        hidden = hidden_size(model)
        with torch.random.fork_rng(devices=[]):  # seed the editor's init without touching the global RNG
            torch.manual_seed(cfg.seed)
            editor = RemediEditor(hidden, cfg.rank, cfg.use_entity).to(model_device(model))
        remedi = cls(layer, hidden, cfg.rank, cfg.alpha, cfg.use_entity, editor=editor, name=name,
                     config={**as_dict(cfg), "n_samples": len(samples)}, side=cfg.side)
        train_editor(remedi, model, tok, samples, cfg, progress=progress, encode_batch_size=encode_batch_size)
        return remedi

    # ---- persistence ---------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"layer": self.layer, "side": self.side, "hidden_size": self.hidden_size, "rank": self.rank,
                "alpha": self.alpha, "use_entity": self.use_entity, "config": self.config}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"editor.{k}": v.detach() for k, v in self.editor.state_dict().items()}

    @classmethod
    def from_saved(cls, sites: list[str], positions: Positions, name: str, params: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> Remedi:
        # Everything is checked against the file before the editor is built, so its size is that of the
        # tensors actually present, never just what hidden_size declares.
        p = validate(RemediParams, params, InterventionError, None, "params")
        want_site = f"layers.{p.layer}" + (":input" if p.side == "input" else "")
        if sites != [want_site]:
            raise InterventionError(f"REMEDI sites {sites} do not match its layer {p.layer} ({p.side})")
        if p.rank is not None and p.rank > p.hidden_size:
            raise InterventionError(f"params.rank: expected at most hidden_size={p.hidden_size}, got {p.rank}")
        want = {f"editor.{k}": s for k, s in RemediEditor.expected_shapes(p.hidden_size, p.rank, p.use_entity).items()}
        have = {k: tuple(v.shape) for k, v in tensors.items()}
        if want != have:
            raise InterventionError(f"REMEDI tensors {have} do not match its config (expects {want})")
        dtypes = {v.dtype for v in tensors.values()}
        for k, v in tensors.items():
            check_tensor(v, InterventionError, None, f"tensor {k!r}")
            if k.endswith("_scale") and k != "editor.out_scale" and not bool((v > 0).all()):
                raise InterventionError(f"tensor {k!r}: expected a positive scale (it divides), got {float(v[0])}")
        if len(dtypes) > 1:  # loading them into one module would round some of them
            raise InterventionError(f"REMEDI tensors: expected one dtype, got {sorted(map(str, dtypes))}")
        editor = RemediEditor(p.hidden_size, p.rank, p.use_entity)
        editor.to(dtypes.pop())
        editor.load_state_dict({k[len("editor."):]: v for k, v in tensors.items()})
        return cls(p.layer, p.hidden_size, editor.rank, p.alpha, editor.use_entity, editor=editor, name=name,
                   config=p.config, side=p.side)

    def expected_shapes(self, sites: Mapping[str, Site]) -> dict[str, tuple[int, ...]]:
        return {}  # checked in bind: the editor's width against the site's

    def bind(self, sites: Mapping[str, Site]) -> None:
        for concrete, site in sites.items():
            if site.width is not None and site.width != self.hidden_size:
                raise InterventionError(f"{self.name}: the editor is {self.hidden_size} wide, site {concrete!r} "
                                        f"is {site.width}")

    def __repr__(self) -> str:
        return (f"Remedi(name={self.name!r}, site={self.site!r}, rank={self.rank}, alpha={self.alpha}, "
                f"use_entity={self.use_entity})")

