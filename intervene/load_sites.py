"""Sites named in a file, resolved on the model at load time with their activation's width known.

A diff may name any module path (``lm_head``, ``model.layers.3.mlp.act_fn:output``). For canonical
sites and a few module types the width is known from the model's structure; for the rest it is
measured by one tiny forward pass (two tokens, in eval mode and without gradients, temporary capture
hooks that change nothing, removed in ``finally``; each module's training flag restored), run only when
a file names such a site. So every tensor's shape is checked by
``bind`` *before* anything is attached: a vector that does not fit ``lm_head``'s output fails at
load time, not at the first forward, and a site whose activation an intervention cannot edit (one
that never runs, or does not produce a ``[batch, seq, ...]`` tensor) is refused.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import replace

import torch
from torch import nn

from intervene.errors import IncompatibleModelError, SiteError, UnsupportedModelError
from intervene.hooks import HookSet, add_input_hook, add_output_hook
from intervene.sites import Site, expand_sites, resolve_site

_PROBE_TOKENS = 2


def _static_width(site: Site) -> int | None:
    """The output width of the module types whose output is their weight's width."""
    if site.side != "output":
        return None
    m = site.module
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return int(m.normalized_shape[0])
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.ndim == 2:
        return int(w.shape[1])  # GPT-2's Conv1D stores [in, out]
    return None


def _probe(model: nn.Module, sites: dict[str, Site], path: str, field: str) -> dict[str, tuple[int, ...]]:
    """Trailing activation shapes at ``sites`` from one tiny forward (the model is left as it was)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def grab(name: str):
        def fn(h: torch.Tensor) -> torch.Tensor:
            shapes.setdefault(name, tuple(h.shape))
            return h
        return fn

    hooks = HookSet()
    try:
        for name, s in sites.items():
            (add_input_hook if s.side == "input" else add_output_hook)(hooks, s.module, grab(name), name)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        kwargs: dict[str, object] = {"input_ids": torch.zeros(1, _PROBE_TOKENS, dtype=torch.long, device=device)}
        try:
            if "use_cache" in inspect.signature(model.forward).parameters:
                kwargs["use_cache"] = False
        except (TypeError, ValueError):
            pass
        modes = {m: m.training for m in model.modules()}
        try:  # eval mode: a training-mode forward could update running statistics (batch norms)
            model.eval()
            with torch.no_grad():
                model(**kwargs)
        finally:
            for m, mode in modes.items():
                m.training = mode
    except Exception as e:  # a trial run: whatever fails means the sites cannot be checked
        raise IncompatibleModelError(f"{path}: {field}: could not measure the activations at {sorted(sites)} with a "
                                     f"trial forward pass ({type(e).__name__}: {str(e)[:200]})", path=path,
                                     field=field) from None
    finally:
        hooks.remove()
    out = {}
    for name in sites:
        shape = shapes.get(name)
        if shape is None:
            raise IncompatibleModelError.at(path, field, "sites whose module runs in a forward pass", name)
        if len(shape) < 3 or shape[:2] != (1, _PROBE_TOKENS):
            raise IncompatibleModelError.at(path, field, "sites whose activation is [batch, seq, ...]", name,
                                            note=f"its activation has shape {list(shape)}")
        out[name] = shape[2:]
    return out


def sites_for_load(model: nn.Module, patterns: list[str], path: str | os.PathLike[str],
                   field: str) -> dict[str, Site]:
    """``{concrete site: Site}`` for the ``patterns`` a file names, every ``Site`` with a known shape.

    Raises ``IncompatibleModelError`` naming the file and field for a site that does not resolve or
    whose activation cannot be edited.
    """
    where = os.fspath(path)
    try:
        sites = {n: resolve_site(model, n) for n in expand_sites(model, list(patterns))}
    except (SiteError, UnsupportedModelError) as e:
        raise IncompatibleModelError(f"{where}: {field}: {e}", path=where, field=field) from None
    unknown = {n: s for n, s in sites.items() if s.shape is None}
    widths = {n: w for n, s in unknown.items() if (w := _static_width(s)) is not None}
    rest = {n: s for n, s in unknown.items() if n not in widths}
    if rest:
        widths.update({n: math.prod(shape) for n, shape in _probe(model, rest, where, field).items()})
    return {n: replace(s, width=widths[n]) if n in widths else s for n, s in sites.items()}
