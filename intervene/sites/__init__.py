"""Architecture-neutral site names resolved to modules: a per-family table, else automatic discovery.

Families in ``FAMILIES`` (or taught with :func:`register_family`) resolve from the table and the config.
Any other decoder-only causal LM is resolved by :mod:`intervene.sites.discovery`, which finds the block
list, the residual writers and the attention output projection and checks them with a probe forward
pass on first use; what it cannot resolve raises ``SiteError`` / ``UnsupportedModelError`` naming why.

Names (docs/architecture.md):

* ``layers.{i}`` — output of decoder block ``i`` (the residual stream after it);
  ``layers.{i}:input`` — its input.
* ``layers.{i}.attn`` / ``layers.{i}.mlp`` — what attention / the MLP write into the residual. ``attn`` is
  the block's token-mixing branch: attention, or in a state-space / recurrent layer the mixer in its
  place (a Mamba layer's ``mixer``); ``mlp`` the branch acting on each position alone. A part a block
  does not have (no MLP in a Mamba block) raises ``SiteError`` saying so.
* ``layers.{i}.heads`` — the input of the attention output projection viewed as
  ``[..., n_heads, head_dim]`` (exact under grouped-query attention: it is after attention).
* any module path (``model.layers.3.self_attn.o_proj``) with an optional ``:input`` / ``:output``.

Wildcards (``layers.*``, ``layers.*.heads``) expand in layer order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from torch import nn

from intervene.errors import SiteError, UnsupportedModelError
from intervene.sites.discovery import Discovered, LayerParts, config_of, discover, in_features

Side = Literal["input", "output"]


@dataclass(frozen=True)
class Family:
    """Where a family keeps its blocks and the modules that write into the residual stream.

    Paths are relative to the causal-LM wrapper (``LlamaForCausalLM``); the bare base model
    (``LlamaModel``) is handled by dropping the first path component.
    """

    layers: str
    attn_out: str  # relative to a block: the attention output projection
    mlp_out: str  # relative to a block: the last module of the MLP branch
    embed: str  # token embedding, relative to the wrapper
    attn_writer: str | None = None  # module whose *output* is added to the residual, if not attn_out
    mlp_writer: str | None = None  # likewise for the MLP (post-norms in Gemma-2/3)
    moe: bool = False


_LLAMA = Family("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.embed_tokens")
_GEMMA2 = Family("model.layers", "self_attn.o_proj", "mlp.down_proj", "model.embed_tokens",
                 attn_writer="post_attention_layernorm", mlp_writer="post_feedforward_layernorm")
_MOE = Family("model.layers", "self_attn.o_proj", "mlp", "model.embed_tokens", moe=True)

FAMILIES: dict[str, Family] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "granite")},
    "gemma2": _GEMMA2,
    "olmo2": _GEMMA2,  # post-norms on the attention / MLP outputs, before the residual add
    "gemma3_text": _GEMMA2,
    "mixtral": _MOE,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE,
    "gpt2": Family("transformer.h", "attn.c_proj", "mlp.c_proj", "transformer.wte"),
    "gpt_neox": Family("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h", "gpt_neox.embed_in"),
    "gptj": Family("transformer.h", "attn.out_proj", "mlp.fc_out", "transformer.wte"),
    "opt": Family("model.decoder.layers", "self_attn.out_proj", "fc2", "model.decoder.embed_tokens"),
    "falcon": Family("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", "transformer.word_embeddings"),
    "bloom": Family("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", "transformer.word_embeddings"),
    "phi": Family("model.layers", "self_attn.dense", "mlp.fc2", "model.embed_tokens"),
}


def register_family(model_type: str, family: Family) -> None:
    """Teach the site table a new ``config.model_type`` (or override a built-in one, or discovery)."""
    FAMILIES[model_type] = family


@dataclass(frozen=True)
class Site:
    """One resolved site: which module, which side of it, and how to view the activation.

    ``heads`` is ``(n_heads, head_dim)`` when the activation is viewed per head; ``width`` is the
    size of the activation's last dimension as the module sees it (``n_heads*head_dim`` for heads).
    """

    name: str
    module_path: str
    module: nn.Module = field(compare=False, repr=False)
    side: Side
    layer: int | None = None
    heads: tuple[int, int] | None = None
    width: int | None = None

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Trailing shape of the activation an intervention sees at this site."""
        if self.heads is not None:
            return self.heads
        return None if self.width is None else (self.width,)


_CANON = re.compile(r"^layers\.(\d+)(?:(:input|:output)|\.(attn|mlp|heads))?$")


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """First attribute of ``config`` (or its ``text_config``) among ``names`` that is set."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for n in names:
            v = getattr(cfg, n, None)
            if v is not None:
                return v
    return default


def in_table(model: nn.Module) -> bool:
    """Whether ``model``'s family resolves from the site table (else: from discovery)."""
    return getattr(getattr(model, "config", None), "model_type", None) in FAMILIES


def structure(model: nn.Module) -> Family | Discovered:
    """The table entry of ``model``'s family, else its discovered (and checked) structure.

    Raises ``UnsupportedModelError`` naming what discovery could not resolve.
    """
    if in_table(model):
        return FAMILIES[config_of(model).model_type]
    return _discovered(model)


def _discovered(model: nn.Module) -> Discovered:
    """:func:`discover`, its failure reworded for a model that is not in the site table."""
    try:
        return discover(model)
    except UnsupportedModelError as e:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        raise UnsupportedModelError(f"model_type {mtype!r} is not in intervene's site table and automatic discovery "
                                    f"failed: {e}. Use raw module paths as sites, or teach the family with "
                                    "intervene.register_family().") from None


def family_of(model: nn.Module) -> Family:
    """The site-table entry for ``model``, or one built from its discovered structure when that is the
    same in every block; raises ``UnsupportedModelError`` otherwise (use :func:`layer_parts`)."""
    found = structure(model)
    if isinstance(found, Family):
        return found
    first = found.parts[0]
    key = (first.attn, first.mlp, first.attn_proj, first.mlp_proj)
    attn, mlp, attn_proj = key[:3]
    if any((p.attn, p.mlp, p.attn_proj, p.mlp_proj) != key for p in found.parts) or \
            attn is None or mlp is None or attn_proj is None:
        why = next((f"block {i}: {w}" for i, p in enumerate(found.parts) for w in p.missing.values()),
                   "its blocks differ (a hybrid or dense/MoE mix)")
        raise UnsupportedModelError(f"{type(model).__name__} has no single per-block layout ({why}); sites resolve "
                                    "per block (intervene.sites.layer_parts), or teach one with register_family()")
    return Family(found.layers, attn_proj, first.mlp_proj or mlp, found.embed or "",
                  attn_writer=None if attn == attn_proj else attn,
                  mlp_writer=None if mlp == (first.mlp_proj or mlp) else mlp,
                  moe=first.mlp_proj is None)


def layer_parts(model: nn.Module, layer: int) -> LayerParts:
    """What block ``layer`` writes into the residual (paths relative to the block).

    From the table: writers, projections, no heads (computed from the config on resolution) and no
    wiring facts. From discovery: everything, with ``missing`` naming what did not resolve.
    """
    found = structure(model)
    if isinstance(found, Family):
        return LayerParts(found.attn_writer or found.attn_out, found.mlp_writer or found.mlp_out, found.attn_out,
                          found.mlp_out)
    return found.parts[layer]


def _get(model: nn.Module, path: str) -> tuple[str, nn.Module] | None:
    """Module at ``path`` on the wrapper, or on the bare base model (first component dropped)."""
    for p in (path, path.split(".", 1)[1] if "." in path else None):
        if p is None:
            continue
        try:
            return p, model.get_submodule(p)
        except AttributeError:
            continue
    return None


_in_features = in_features


def num_layers(model: nn.Module) -> int:
    if not in_table(model):
        return len(_discovered(model).parts)
    return int(config_value(config_of(model), "num_hidden_layers", "n_layer", "num_layers"))


def num_heads(model: nn.Module) -> int:
    return int(config_value(config_of(model), "num_attention_heads", "n_head"))


def hidden_size(model: nn.Module) -> int:
    return int(config_value(config_of(model), "hidden_size", "n_embd", "d_model"))


def block_path(model: nn.Module, layer: int) -> tuple[str, nn.Module]:
    found = structure(model)
    if isinstance(found, Discovered):
        path = f"{found.layers}.{layer}"
        return path, model.get_submodule(path)
    hit = _get(model, f"{found.layers}.{layer}")
    if hit is None:
        raise SiteError(f"could not find block {layer} at {found.layers!r} on {type(model).__name__}")
    return hit


def head_shape(model: nn.Module, o_proj: nn.Module) -> tuple[int, int]:
    """``(n_heads, head_dim)`` of the input of an attention output projection (from the config)."""
    n = num_heads(model)
    width = _in_features(o_proj)
    if width is None or width % n:
        raise SiteError(f"cannot view the input of {type(o_proj).__name__} as {n} heads")
    return n, width // n


def _resolve_canonical(model: nn.Module, name: str, m: re.Match) -> Site:
    layer = int(m.group(1))
    if layer >= num_layers(model):
        raise SiteError(_unknown_message(model, name))
    parts = layer_parts(model, layer)
    part = m.group(3) or "block"
    if part in parts.absent:
        raise SiteError(f"site {name!r} does not exist on {type(model).__name__}: {parts.missing[part]}; the "
                        "architecture has no such part in this block (other blocks may: see site_names())")
    if part in parts.missing:
        raise SiteError(f"site {name!r} does not resolve on {type(model).__name__}: {parts.missing[part]}. Use a "
                        "raw module path instead, or teach the structure with intervene.register_family()")
    bpath, block = block_path(model, layer)
    hidden = hidden_size(model)
    if part == "block":
        side: Side = "input" if m.group(2) == ":input" else "output"
        return Site(name, bpath, block, side, layer, None, hidden)
    sub = {"attn": parts.attn, "mlp": parts.mlp, "heads": parts.attn_proj}[part]
    if sub is None:  # discovery names why in `missing` (checked above); a LayerParts without either is a bug
        raise SiteError(f"site {name!r} does not resolve on {type(model).__name__}: block {layer} has no {part} "
                        "module and no reason recorded for it")
    try:
        mod = block.get_submodule(sub)
    except AttributeError as e:
        raise SiteError(f"{type(model).__name__} block {layer} has no {sub!r} for site {name!r}") from e
    if part == "heads":
        return Site(name, f"{bpath}.{sub}", mod, "input", layer, parts.heads or head_shape(model, mod), None)
    return Site(name, f"{bpath}.{sub}", mod, "output", layer, None, hidden)


def _resolve_raw(model: nn.Module, name: str) -> Site:
    path, _, suffix = name.partition(":")
    suffix = suffix or "output"
    if suffix not in ("input", "output"):
        raise SiteError(f"site {name!r}: the suffix must be ':input' or ':output'")
    side = cast(Side, suffix)
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        raise SiteError(_unknown_message(model, name)) from None
    width = _in_features(mod) if side == "input" else None
    return Site(name, path, mod, side, None, None, width)


def resolve_site(model: nn.Module, name: str) -> Site:
    """Resolve one concrete (wildcard-free) site name on ``model``."""
    m = _CANON.match(name)
    if m is not None:
        return _resolve_canonical(model, name, m)
    if name.startswith("layers.") and "." not in name[7:].split(":")[0].lstrip("0123456789"):
        raise SiteError(_unknown_message(model, name))
    return _resolve_raw(model, name)


def site_names(model: nn.Module) -> list[str]:
    """Every canonical site name of ``model`` that resolves, in layer order."""
    out = []
    for i in range(num_layers(model)):
        miss = layer_parts(model, i).missing
        names = [f"layers.{i}:input", f"layers.{i}", f"layers.{i}.attn", f"layers.{i}.mlp", f"layers.{i}.heads"]
        out += [n for n, k in zip(names, ("block", "block", "attn", "mlp", "heads")) if k not in miss]
    return out


def wildcard_match(pattern: str, name: str) -> bool:
    """Glob match where ``*`` / ``?`` stay within one name component (no ``.`` or ``:``)."""
    rx = _WILDCARD_CACHE.get(pattern)
    if rx is None:
        parts = []
        for ch in pattern:
            parts.append("[^.:]+" if ch == "*" else "[^.:]" if ch == "?" else re.escape(ch))
        rx = _WILDCARD_CACHE[pattern] = re.compile("^" + "".join(parts) + "$")
    return rx.match(name) is not None


_WILDCARD_CACHE: dict[str, re.Pattern] = {}


def expand_sites(model: nn.Module, patterns: str | list[str]) -> list[str]:
    """Expand wildcards (``layers.*``, ``layers.*.heads``, ``layers.1?``) into concrete names.

    ``*`` matches within one component: ``layers.*`` is every block output, not every site.

    Order follows the patterns, then layer order; duplicates are dropped.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    names: list[str] = []
    canon = None
    for pat in patterns:
        if any(c in pat for c in "*?"):
            canon = canon or site_names(model)
            hits = [n for n in canon if wildcard_match(pat, n)]
            if not hits:
                raise SiteError(_unknown_message(model, pat))
        else:
            hits = [pat]
        names += [h for h in hits if h not in names]
    return names


def resolve_sites(model: nn.Module, patterns: str | list[str]) -> list[Site]:
    """Expand and resolve ``patterns``; raises ``SiteError`` listing valid names on a miss."""
    return [resolve_site(model, n) for n in expand_sites(model, patterns)]


def _unknown_message(model: nn.Module, name: str) -> str:
    try:
        n = num_layers(model)
        r = f"{{0..{n - 1}}}"
        valid = (f"layers.{r}, layers.{r}:input, layers.{r}.attn, layers.{r}.mlp, layers.{r}.heads, "
                 "wildcards like layers.* or layers.*.heads")
    except UnsupportedModelError as e:
        valid = f"none: {e} (only module paths work)"
    example = next((n for n, _ in model.named_modules() if n), "")
    return (f"unknown site {name!r} for {type(model).__name__}. Valid names: {valid}; or a module path "
            f"such as {example!r} with an optional ':input'/':output'.")
