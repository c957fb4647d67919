"""Find an unknown causal LM's blocks, residual writers and attention output projection, and check them.

Used by :mod:`intervene.sites` for every ``config.model_type`` that is not in its table. Nothing is
taken from names alone: candidates come from the module tree, and probe forward passes
(:mod:`intervene.sites.probe`) on a few tokens decide.

1. **Blocks**: ``ModuleList`` s inside ``get_decoder()`` (else the whole model) whose elements are the
   classes named in ``_no_split_modules``, ``GradientCheckpointingLayer`` subclasses, or as many as
   ``num_hidden_layers``; the best-ranked one that runs on text. Checked: each block runs once, and
   block ``i``'s output is block ``i+1``'s input (or a constant times it: RWKV halves the residual every
   ``rescale_every`` blocks; recorded in ``Discovered.between``).
2. **Residual writers** (:mod:`intervene.sites.residual`): for block ``i``, the two submodules (attention
   first) whose outputs add up to ``output - input`` — exactly, or each times a constant (Granite's
   ``residual_multiplier``; the gain is recorded) — or, in a post-LN block, whose outputs are added
   before each of its two norms. Among modules with the same output the last Linear-like one is named
   (``self_attn.o_proj`` rather than ``self_attn``), else the outermost (a whole MoE block). A writer
   that is not Linear-like (a post-norm) gets a *projection*: the Linear whose output it reads.
   Blocks this cannot explain are followed step by step (:mod:`intervene.sites.chain`): residuals
   scaled or gated by constants or per-channel vectors, a third writer, one writer; attention and MLP
   are then told apart by measurement (does the branch mix tokens; does it compute attention).
3. **Heads**: the attention projection's input, ``in_features = n_heads * head_dim``, with ``n_heads``
   from the attention module or the (per-layer) config, used only when it divides exactly; *absent*
   when neither declares any head count (RWKV-4, Mamba-1: their mixers have no heads).
4. **Wiring** (:func:`intervene.sites.probe.parallel_mlps`, :func:`~intervene.sites.probe.embedding_path`):
   a second pass holds every block's input fixed and perturbs attention's output; the MLP's output
   moving means sequential, staying put means parallel. A third perturbs the token embedding: how
   block 0's input follows gives ``embed_gain`` (``None`` through a norm, or when the logits move
   too, i.e. the embedding feeds more than block 0).

What cannot be resolved is recorded per block with the reason (``LayerParts.missing``), which
:mod:`intervene.sites` raises as ``SiteError`` for the sites that need it; parts the block provably
does not have (no MLP in a Mamba block) are marked ``LayerParts.absent`` besides. A block list that
fails the checks raises ``UnsupportedModelError``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from intervene.errors import UnsupportedModelError
from intervene.sites import block as site_block
from intervene.sites import chain, probe, residual
from intervene.sites.chain import Step
from intervene.sites.residual import Gain, in_features, is_linear

__all__ = ["Discovered", "Gain", "LayerParts", "Step", "config_of", "discover", "in_features", "is_linear"]


@dataclass(frozen=True)
class LayerParts:
    """What block ``i`` writes into the residual stream; paths are relative to the block.

    ``attn`` / ``mlp``: modules whose outputs the block adds to the residual, ``out = in + attn_gain *
    attn + mlp_gain * mlp`` (gains are 1 but in families with residual multipliers); with
    ``post_norm`` the block is post-LN, ``out = N2(N1(in + attn) + mlp)``. ``attn_proj`` / ``mlp_proj``:
    the Linear-like module producing that value before any post-norm (the writer itself when there is
    none); ``attn_proj``'s input is the heads site. ``heads``: ``(n_heads, head_dim)`` of that input.
    ``parallel``: the MLP reads the block input rather than input + attention (``None``: unknown).
    ``missing``: ``{"block"|"attn"|"mlp"|"heads"|"attn_proj"|"mlp_proj": why it did not resolve}``;
    ``absent``: the parts among those the block does not have at all (not merely unresolved).

    Blocks resolved step by step (``steps`` non-empty, :class:`~intervene.sites.chain.Step`) may also
    have: gains per hidden channel (tuples), each writer's gain being the one at the step that adds
    it; ``resid_gain``, how the block's input reaches its output (``None``: through a norm, ``normed``);
    ``offset``, a constant added besides the writers; ``extra``, further writers (neither attention nor
    the MLP); ``mlp_last``: nothing is added after the MLP.
    """

    attn: str | None = None
    mlp: str | None = None
    attn_proj: str | None = None
    mlp_proj: str | None = None
    heads: tuple[int, int] | None = None
    parallel: bool | None = None
    attn_gain: Gain = 1.0
    mlp_gain: Gain = 1.0
    post_norm: bool = False
    missing: Mapping[str, str] = field(default_factory=dict)
    absent: frozenset[str] = frozenset()
    resid_gain: Gain | None = 1.0
    offset: bool = False
    extra: tuple[str, ...] = ()
    normed: bool = False
    mlp_last: bool = True
    steps: tuple[Step, ...] = ()

    @property
    def plain(self) -> bool:
        """``out = c0 * in + c1 * attn + c2 * mlp`` with constants and nothing else (what projecting the
        residual stream through its writers needs)."""
        gains = (self.attn_gain, self.mlp_gain, self.resid_gain)
        return (self.attn is not None and self.mlp is not None and not self.post_norm and not self.normed
                and not self.offset and not self.extra and all(isinstance(g, float) for g in gains))


@dataclass(frozen=True)
class Discovered:
    """A model's structure as found and checked by :func:`discover`.

    ``layers``: path of the block list on the model; ``embed``: path of the token embedding.
    ``embed_gain``: how much block 0's input moves per unit change of a token's embedding row (the
    embedding's own scale times any multiplier after it; ``None``: not linearly, e.g. through a norm,
    or the embedding also feeds something besides block 0). ``pos_embed``: a learned position
    embedding added before block 0, if any; ``embed_offset``: something else (unidentified) is.
    ``between[i]``: block ``i + 1``'s input is block ``i``'s output times this (1.0 but for models that
    rescale the residual between blocks: then ``layers.{i}`` and ``layers.{i+1}:input`` differ by it).
    """

    layers: str
    parts: tuple[LayerParts, ...]
    embed: str | None = None
    embed_gain: float | None = None
    pos_embed: str | None = None
    embed_offset: bool = False
    between: tuple[float, ...] = ()


_CACHE: weakref.WeakKeyDictionary[nn.Module, Discovered] = weakref.WeakKeyDictionary()


def discover(model: nn.Module) -> Discovered:
    """The checked structure of ``model`` (found once per model object, then cached).

    Raises ``UnsupportedModelError`` naming what could not be resolved.
    """
    found = _CACHE.get(model)
    if found is None:
        found = _CACHE[model] = _discover(model)
    return found


# ---- small helpers ------------------------------------------------------------------------------
def config_of(model: nn.Module) -> Any:
    """``model.config`` (a ``transformers`` config: any attributes, so ``Any``). ``nn.Module.__getattr__``
    types every attribute as ``Tensor | Module``; this is the one place that says otherwise. Raises
    ``AttributeError`` like the attribute does when the model has no config."""
    return model.config


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    try:
        return cfg.get_text_config(decoder=True)
    except Exception:  # noqa: BLE001 - older configs, or several candidate sub-configs
        return cfg


def _cfg_int(obj: Any, names: tuple[str, ...]) -> int | None:
    """First of ``names`` that ``obj`` holds as a plain int (per-layer config attributes raise on global access)."""
    for n in names:
        try:
            v = getattr(obj, n, None)
        except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError
            continue
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


# ---- 1. the block list --------------------------------------------------------------------------
def block_candidates(model: nn.Module) -> list[nn.ModuleList]:
    """``ModuleList`` s that may be the decoder blocks, best first (not yet checked)."""
    try:
        get_decoder = getattr(model, "get_decoder", None)
        dec = get_decoder() if callable(get_decoder) else model
    except Exception:  # noqa: BLE001 - some wrappers raise instead of returning self
        dec = model
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    n_cfg = _cfg_int(_text_config(model), ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    gc_layer: type | None
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        gc_layer = GradientCheckpointingLayer
    except ImportError:  # older transformers
        gc_layer = None
    ranked: list[tuple[tuple, int, nn.ModuleList]] = []
    # the decoder's subtree first (vision towers share the hints), then the rest of the model
    roots = [dec, model] if isinstance(dec, nn.Module) and dec is not model else [model]
    seen: set[int] = set()
    for rank, root in enumerate(roots):
        for mod in root.modules():
            if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or id(mod) in seen:
                continue
            seen.add(id(mod))
            hints = (all(type(b).__name__ in no_split for b in mod),
                     gc_layer is not None and all(isinstance(b, gc_layer) for b in mod), len(mod) == n_cfg)
            if any(hints):
                ranked.append(((-rank, sum(hints), sum(p.numel() for p in mod.parameters())), len(ranked), mod))
    return [m for *_, m in sorted(ranked, key=lambda r: (r[0], -r[1]), reverse=True)]


def _pick_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    names = {id(m): n for n, m in model.named_modules()}
    cands = [c for c in block_candidates(model) if id(c) in names]
    if not cands:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no decoder block list (a ModuleList of the classes in "
            f"_no_split_modules, of GradientCheckpointingLayer, or of num_hidden_layers modules)")
    if len(cands) > 1:  # e.g. a vision tower's layers: keep the first list that runs on text
        ran = probe.count_calls(model, [c[0] for c in cands])
        cands = [c for c, k in zip(cands, ran) if k > 0] or cands
    return names[id(cands[0])], cands[0]


# ---- 2. residual writers ------------------------------------------------------------------------
def _writers(rec: probe.Record, i: int, block: nn.Module, dtype: torch.dtype,
             call: tuple[tuple, dict] | None = None, h: int = 0) -> tuple[dict[str, Any], dict[str, str]]:
    """``(found, {part: why missing})`` for block ``i``: ``found`` has ``attn`` / ``mlp`` / ``attn_proj`` /
    ``mlp_proj`` and the arithmetic (``gains``, ``post_norm``, and for chains the :class:`LayerParts`
    fields named alike). The two-writer check first (:mod:`intervene.sites.residual`); a block it cannot
    explain is followed step by step (:mod:`intervene.sites.chain`, which re-runs it: ``call``)."""
    x, y = rec.block_in.get(i), rec.block_out.get(i)
    if x is None or y is None:
        why = f"block {i} does not take and return one [batch, seq, hidden] tensor"
        return {}, {"attn": why, "mlp": why}
    found_groups = [g for g in residual.groups(rec, i, block) if g.value.shape == x.shape]
    tol = probe.tol(x, y, *(g.value for g in found_groups), dtype=dtype)
    fits, post_norm = residual.two_writers(rec, i, block, x, y, found_groups, tol)
    if len(fits) == 1:
        return residual.found_pair(rec, i, block, found_groups, fits[0], post_norm)
    if fits:
        why = f"block {i}: several pairs of submodules add up to its output minus its input"
        return {}, {"attn": why, "mlp": why}
    return chain.chain_writers(rec, i, block, found_groups, x, y, tol, call, h)


# ---- 3. heads -----------------------------------------------------------------------------------
_N_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_v_heads")
_HEAD_DIM = ("head_dim", "v_head_dim", "head_v_dim", "head_size")


def _layer_config(model: nn.Module, i: int) -> Any:
    cfg = _text_config(model)
    try:
        per = getattr(cfg, "per_layer_config", None)
        return per[i] if per is not None and len(per) > i else cfg
    except Exception:  # noqa: BLE001
        return cfg


def _heads(model: nn.Module, block: nn.Module, i: int, proj: str,
           from_config: bool = True) -> tuple[tuple[int, int] | None, str, bool]:
    """``((n_heads, head_dim), "", False)`` of ``proj``'s input (the attention module's own count wins over
    the config), else ``(None, why, absent)``: ``absent`` when neither declares any head count at all.

    ``from_config=False``: attention was seen in the model but not in this branch (a Mamba mixer in a
    hybrid stack), so the config's *attention* head count says nothing about it; only its own module's."""
    width = in_features(block.get_submodule(proj))
    if width is None:
        return None, f"{proj} has no in_features", False
    owners = [block.get_submodule(proj.rsplit(".", k)[0]) for k in range(1, proj.count(".") + 1)] + [block]
    n_mod = next((n for m in owners if (n := _cfg_int(m, _N_HEADS)) is not None), None)
    hd_mod = next((d for m in owners if (d := _cfg_int(m, _HEAD_DIM)) is not None), None)
    lcfg = _layer_config(model, i)
    per_layer = getattr(lcfg, "num_attention_heads_per_layer", None)
    n_cfg = per_layer[i] if isinstance(per_layer, (list, tuple)) and len(per_layer) > i else \
        _cfg_int(lcfg, ("num_attention_heads", "n_head", "num_heads", "n_heads"))
    if not from_config and n_mod is None and hd_mod is None and n_cfg is not None:
        return None, (f"{proj}'s module declares no head count, and the config's ({n_cfg}) is attention's: this "
                      "branch computes no attention"), False
    n_cfg = n_cfg if from_config else None
    if n_mod and width % n_mod == 0:
        return (n_mod, width // n_mod), "", False
    if n_cfg and width % n_cfg == 0 and (hd_mod is None or width // n_cfg == hd_mod):
        return (n_cfg, width // n_cfg), "", False
    if n_mod is None and n_cfg is None and hd_mod and width % hd_mod == 0:
        return (width // hd_mod, hd_mod), "", False
    if n_mod is None and n_cfg is None and hd_mod is None and not _declares_heads(lcfg):
        return None, (f"{proj}'s input has no heads: neither its module nor the config declares a head count or "
                      f"head size (the architecture's mixer has no heads)"), True
    return None, (f"{proj} takes {width} inputs, which is not n_heads x head_dim for n_heads {n_mod or n_cfg} / "
                  f"head_dim {hd_mod} (from the attention module and config)"), False


def _declares_heads(cfg: Any) -> bool:
    """Whether a config names any head count or size (a per-layer one included)."""
    names = _N_HEADS + _HEAD_DIM + ("num_attention_heads_per_layer", "num_key_value_heads", "n_head_kv")
    try:
        keys = set(cfg.to_dict())
    except Exception:  # noqa: BLE001 - not a transformers config: judge by attributes
        keys = {n for n in names if hasattr(cfg, n)}
    return any(n in keys for n in names)


# ---- putting it together -------------------------------------------------------------------------
def _discover(model: nn.Module) -> Discovered:
    name = type(model).__name__
    emb, w = probe.embedding_weight(model)
    if any(p.is_meta for p in model.parameters()):
        raise UnsupportedModelError(f"{name}'s weights are on the meta device; its structure is checked with a "
                                    "forward pass, so load the weights first")
    h = int(w.shape[1])
    names = {id(m): n for n, m in model.named_modules()}
    try:
        path, blocks = _pick_blocks(model)
        inside = {id(m) for b in blocks for m in b.modules()}
        extras = {names[id(m)]: m for m in model.modules()
                  if isinstance(m, nn.Embedding) and m is not emb and id(m) not in inside and id(m) in names}
        rec = probe.record(model, blocks, emb, extras, h)
    except UnsupportedModelError:
        raise
    except Exception as e:
        raise UnsupportedModelError(f"{name}: the self-check forward pass on {probe.BATCH}x{probe.SEQ} token ids "
                                    f"failed ({type(e).__name__}: {e})") from e
    dtype = next(iter(rec.raw_in.values())).dtype if rec.raw_in else torch.float32
    why_out, between = _check_chain(name, path, rec, len(blocks), dtype)
    found, missing = [], []
    for i, block in enumerate(blocks):
        f, m = _analyse(rec, i, block, h, dtype) if i not in why_out else ({}, {})
        if i in why_out or "block" in m:
            why = why_out.get(i) or m["block"]
            f, m = {}, dict.fromkeys(("block", "attn", "mlp", "heads"), why)
        found.append(f)
        missing.append(m)
    try:
        writers = [(f["attn"], f["mlp"]) if f.get("attn") and f.get("mlp") else None for f in found]
        parallel = probe.parallel_mlps(model, blocks, rec, writers, h)
        gain, pos, offset = probe.embedding_path(model, blocks, rec, emb, h)
    except Exception as e:
        raise UnsupportedModelError(f"{name}: the self-check's later passes (block inputs held fixed) failed "
                                    f"({type(e).__name__}: {e})") from e
    # where attention is seen (eager or SDPA attention) in some block, a branch seen computing none is not
    # attention, so the config's attention head count says nothing about it (Jamba's Mamba-1 layers);
    # where it is seen nowhere (a fused kernel), nothing is known and the config applies as before
    visible = any(f.get("attention_seen") for f in found)
    parts = [_parts(model, block, i, found[i], missing[i], parallel[i], visible) for i, block in enumerate(blocks)]
    return Discovered(path, tuple(parts), names.get(id(emb)), gain, pos, offset, between)


def _parts(model: nn.Module, block: nn.Module, i: int, f: dict[str, Any], m: dict[str, str],
           parallel: bool | None, attention_visible: bool) -> LayerParts:
    """Block ``i``'s :class:`LayerParts` from what :func:`_writers` found, with its heads (the config's
    attention head count used unless attention is seen elsewhere in the model but not in this branch)."""
    heads = None
    absent = set(f.get("absent", ()))
    if "attn_proj" in f:
        heads, why, none = _heads(model, block, i, f["attn_proj"], f.get("attention", True) or not attention_visible)
        if heads is None:
            m["heads"] = why
            if none:
                absent.add("heads")
    else:
        m.setdefault("heads", m.get("attn_proj") or m.get("attn") or "no attention output projection")
        if "attn" in absent:
            absent.add("heads")
    gains = f.get("gains", (1.0, 1.0))
    return LayerParts(f.get("attn"), f.get("mlp"), f.get("attn_proj"), f.get("mlp_proj"), heads, parallel, gains[0],
                      gains[1], f.get("post_norm", False), m, frozenset(absent), f.get("resid_gain", 1.0),
                      f.get("offset", False), f.get("extra", ()), f.get("normed", False), f.get("mlp_last", True),
                      f.get("steps", ()))


def _analyse(rec: probe.Record, i: int, block: nn.Module, h: int,
             dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, str]]:
    """Block ``i``'s writers, from re-running it alone in float32 (checked against pass 1's output)."""
    if i not in rec.args:
        return {}, {"block": f"block {i} was not called with a [batch, seq, hidden] input"}
    try:
        # the clone of its input taken before it ran: a block may have added into that tensor in place
        call = probe.replace_input(*rec.args[i], rec.raw_in[i])
        again = site_block.rerun(block, i, call, h)
    except Exception as e:  # noqa: BLE001 - a block that cannot run on its own is reported, not guessed at
        why = f"block {i} cannot be re-run on its own for the self-check ({type(e).__name__}: {e})"
        return {}, {"attn": why, "mlp": why}
    a, b = again.block_out.get(i), rec.block_out.get(i)
    if a is None or b is None or a.shape != b.shape or \
            float((a - b).abs().max()) > 0.05 * float(b.abs().max()) + probe.tol(b, dtype=dtype):
        why = f"block {i} run again on its own does not reproduce its output (it depends on state from the pass)"
        return {}, {"attn": why, "mlp": why}
    found, missing = _writers(again, i, block, torch.float32, call, h)
    found["attention_seen"] = bool(again.attention)  # anywhere in the block (Zamba's shared transformer)
    return found, missing


def _check_chain(name: str, path: str, rec: probe.Record, n: int,
                 dtype: torch.dtype) -> tuple[dict[int, str], tuple[float, ...]]:
    """``({block: why it is out}, between)`` for blocks that did not run exactly once; ``between[i]``: the
    constant block ``i + 1``'s input is block ``i``'s output times (1.0 but where the model rescales the
    residual between blocks, as RWKV does every ``rescale_every`` blocks in eval mode).

    Raises ``UnsupportedModelError`` when block ``i+1``'s input is not a constant times block ``i``'s output.
    """
    out: dict[int, str] = {}
    for i in range(n):
        k = rec.calls.get(i, 0)
        if k != 1:
            out[i] = (f"block {i} did not run during a text-only forward pass" if k == 0 else
                      f"block {i} runs {k} times per forward pass (a looped stack), so an edit there would apply "
                      f"{k} times")
    if len(out) == n:
        raise UnsupportedModelError(f"{name}: no block of {path} ran exactly once during the self-check forward "
                                    f"pass ({out[0]})")
    between = [1.0] * max(n - 1, 0)
    for i in range(n - 1):
        if i not in out and i + 1 not in out:
            a, b = rec.block_out.get(i), rec.block_in.get(i + 1)
            if a is None or b is None:
                raise UnsupportedModelError(
                    f"{name}: {path}.{i} does not pass one [batch, seq, hidden] tensor to {path}.{i + 1} (several "
                    "residual streams, as with hyper-connections or AltUp, or a sequence-first layout)")
            if a.shape == b.shape and float((a - b).abs().max()) <= probe.tol(a, b, dtype=dtype):
                continue
            s = probe.scalar(b, a, dtype) if a.shape == b.shape else None
            if s is None:
                raise UnsupportedModelError(
                    f"{name}: {path}.{i}'s output is not (a constant times) {path}.{i + 1}'s input, so {path} is "
                    "not one residual stream (something runs between blocks, or the blocks do not return the "
                    "hidden state first)")
            between[i] = s
    return out, tuple(between)
