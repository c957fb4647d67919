"""How each family writes its residual stream: the facts exact baking relies on.

Baking turns an edit of an activation into an edit of the weights that produce it. That is exact
only where we know the block's arithmetic: ``out = x + attn(...) + mlp(...)`` with the MLP reading
``x + attn`` (sequential) or ``x`` (parallel), and which config flag (if any) gives a writer a bias
that vanilla ``from_pretrained`` will load. Families are listed only once checked against their
``transformers`` source (5.x) and the property tests; anything else is refused with a reason.

Families without an entry in ``LAYOUTS`` get one derived from :mod:`intervene.sites.discovery`,
whose probe has already checked the arithmetic: the writers sum to ``out - in``, which MLPs read the
block input (parallel), how block 0's input follows the embedding, and which config flag (a boolean
``*bias*`` attribute) creates a projection's bias, found by building the model on the meta device
with the flag set and comparing parameter names.

Residual points used below: ``embed`` (what block 0 reads), and for block ``i`` its attention and
MLP *writers* (the modules whose outputs are added to the residual), their *projections* (the
Linear producing what a post-norm writer normalises; the writer itself otherwise) and ``post_i``
(its output).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from intervene.errors import NotBakeableError, UnsupportedModelError
from intervene.sites import Site, block_path, in_table, layer_parts, num_layers
from intervene.sites.discovery import LayerParts, config_of, discover

Part = Literal["attn", "mlp"]


def _opt_refusal(model: nn.Module) -> str | None:
    if not getattr(config_of(model), "do_layer_norm_before", True):
        return ("OPT with do_layer_norm_before=False (post-LN, e.g. opt-350m) normalises the residual after "
                "each block, so no bias reproduces an edit of it")
    return None


def _opt_embed_refusal(model: nn.Module) -> str | None:
    dec = getattr(getattr(model, "model", None), "decoder", None)
    if getattr(dec, "project_in", None) is not None:
        return ("OPT with word_embed_proj_dim != hidden_size projects the embeddings with project_in, "
                "which has no bias")
    return None


@dataclass(frozen=True)
class Layout:
    """Baking facts for one ``config.model_type``.

    Args:
        parallel: attention and MLP both read the block input (GPT-J, GPT-NeoX with
            ``use_parallel_residual``, Falcon ``parallel_attn``), so a constant may go to either writer.
        bias_flags: ``{"attn"|"mlp": config attribute}`` that creates that writer's bias (and maybe
            others, which are created as zeros) when set to ``True``.
        pos_embed: learned absolute position embedding (path on the causal-LM wrapper), projected
            together with the token embedding when the embedding output is projected.
        embed_refusal: why the embedding output cannot be edited (a norm after it, a projection).
        refusal: a config-dependent reason the family cannot be baked at all.
        embed_gain: how much block 0's input moves per unit change of an embedding row, measured by
            discovery (the module's own scale times e.g. Granite's ``embedding_multiplier``); ``None``
            (table layouts): the embedding module's ``embed_scale`` attribute, else 1.
        embed_offset: why the embedding cannot be *projected*: something unidentified is added to it
            before block 0 (adding a constant still bakes).
    """

    parallel: bool | Callable[[object], bool] = False
    bias_flags: Mapping[str, str] = field(default_factory=dict)
    pos_embed: str | None = None
    embed_refusal: str | Callable[[nn.Module], str | None] | None = None
    refusal: Callable[[nn.Module], str | None] | None = None
    embed_gain: float | None = None
    embed_offset: str | None = None
    wiring: tuple[LayerParts, ...] | None = None

    def arithmetic(self, model: nn.Module, layer: int) -> LayerParts:
        """Block ``layer``'s residual arithmetic (gains, post-LN): as measured by discovery for derived
        layouts (a table family such as Granite may scale its branches), else the table's plain sum."""
        return self.wiring[layer] if self.wiring is not None else layer_parts(model, layer)

    def is_parallel(self, config: object) -> bool:
        return bool(self.parallel(config) if callable(self.parallel) else self.parallel)

    def embed_problem(self, model: nn.Module) -> str | None:
        r = self.embed_refusal
        return r(model) if callable(r) else r


def plain_problem(parts: LayerParts) -> str | None:
    """Why block arithmetic is not ``c0 * in + c1 * attn + c2 * mlp`` with constants (``None`` when it is):
    only such a block keeps the residual orthogonal to a direction both its writers are projected off."""
    if parts.attn is None or parts.mlp is None:
        return "has no attention and MLP writer pair"
    if parts.extra:
        return f"adds {', '.join(parts.extra)} besides its attention and MLP"
    if parts.normed or parts.resid_gain is None:
        return "normalises the residual itself"
    if parts.offset:
        return "adds a constant besides its writers"
    if not all(isinstance(g, float) for g in (parts.attn_gain, parts.mlp_gain, parts.resid_gain)):
        return "scales its residual per channel"
    return None


def last_writer(parts: LayerParts, layer: int) -> tuple[Part | None, str]:
    """The writer the residual after block ``layer`` was last added to, whose bias can shift it: the MLP, or
    the one branch of a block that has no MLP (a Mamba block); else ``(None, why not)``."""
    if parts.post_norm:
        return None, (f"block {layer} is post-LN, so the residual after it is a LayerNorm's output, which no "
                      "writer's bias can shift")
    if parts.mlp is None and "mlp" in parts.absent and parts.attn is not None and not parts.extra:
        return "attn", ""
    if not parts.mlp_last:
        return None, (f"block {layer} adds {', '.join(parts.extra)} after its MLP, which would also see a constant "
                      "added at the MLP's output, so no writer's bias shifts only the residual after the block")
    return "mlp", ""


_ATTN_FLAG = {"attn": "attention_bias"}
LAYOUTS: dict[str, Layout] = {
    "llama": Layout(bias_flags={"attn": "attention_bias", "mlp": "mlp_bias"}),
    "mistral": Layout(),
    "qwen2": Layout(),
    "qwen3": Layout(bias_flags=_ATTN_FLAG),
    "gemma": Layout(bias_flags=_ATTN_FLAG),
    "phi3": Layout(),
    "mixtral": Layout(),
    "gpt2": Layout(pos_embed="transformer.wpe"),
    "gpt_neox": Layout(parallel=lambda c: bool(getattr(c, "use_parallel_residual", True)), bias_flags=_ATTN_FLAG),
    "gptj": Layout(parallel=True),
    "phi": Layout(parallel=True),
    "opt": Layout(bias_flags={"attn": "enable_bias", "mlp": "enable_bias"},
                  pos_embed="model.decoder.embed_positions", embed_refusal=_opt_embed_refusal,
                  refusal=_opt_refusal),
    "falcon": Layout(parallel=lambda c: bool(getattr(c, "parallel_attn", False)
                                             or getattr(c, "new_decoder_architecture", False)),
                     bias_flags={"attn": "bias", "mlp": "bias"}),
    "bloom": Layout(embed_refusal="BLOOM normalises its embeddings (word_embeddings_layernorm) before block 0; "
                                  "a LayerNorm's elementwise affine cannot absorb the edit"),
}


def register_layout(model_type: str, layout: Layout) -> None:
    """Teach the baker a family (after checking its block arithmetic and bias flags)."""
    LAYOUTS[model_type] = layout


def layout_of(model: nn.Module) -> Layout:
    """The :class:`Layout` of ``model``: its ``LAYOUTS`` entry, else one derived from discovery.

    Raises ``NotBakeableError`` when the structure cannot be checked (with discovery's reason).
    """
    mtype = getattr(config_of(model), "model_type", None)
    lay = None if mtype is None else LAYOUTS.get(mtype)
    if lay is None:
        lay = _DERIVED.get(model)
        if lay is None:
            lay = _DERIVED[model] = _derive(model)
    if lay.refusal is not None and (why := lay.refusal(model)):
        raise NotBakeableError(why)
    return lay


_DERIVED: weakref.WeakKeyDictionary[nn.Module, Layout] = weakref.WeakKeyDictionary()


def _derive(model: nn.Module) -> Layout:
    """A :class:`Layout` from the probe-checked structure (and, for table families, a check that the
    table names the same writers the probe found)."""
    mtype = getattr(config_of(model), "model_type", None)
    try:
        found = discover(model)
    except UnsupportedModelError as e:
        raise NotBakeableError(f"{mtype}: baking needs the block arithmetic checked, and automatic discovery "
                               f"failed: {e}") from None
    if in_table(model):
        for i, p in enumerate(found.parts):
            t = layer_parts(model, i)
            if (p.attn, p.mlp, p.attn_proj) != (t.attn, t.mlp, t.attn_proj) and not p.missing:
                raise NotBakeableError(f"{mtype}: the site table names block {i}'s writers {t.attn}, {t.mlp} but the "
                                       f"probe found {p.attn}, {p.mlp}; fix the table (register_family)")
    parallel = bool(found.parts) and all(p.parallel is True for p in found.parts)
    embed_why = None
    if found.embed_gain is None:
        embed_why = ("the embedding rows reach block 0 through a non-linear map (a norm, say) or also feed "
                     "something besides block 0, so no edit of the rows reproduces an edit of block 0's input")
    offset_why = None
    if found.embed_offset and found.embed_gain is not None:
        offset_why = ("something besides the token embedding (and no position embedding module intervene could "
                      "identify) is added before block 0, so projecting the embedding rows would miss it")
    return Layout(parallel=parallel, bias_flags=_bias_flags(model), pos_embed=found.pos_embed,
                  embed_refusal=embed_why, embed_gain=found.embed_gain, embed_offset=offset_why, wiring=found.parts,
                  refusal=_rescale_refusal if any(s != 1.0 for s in found.between) else None)


def _rescale_refusal(model: nn.Module) -> str:
    i, s = next((i, s) for i, s in enumerate(discover(model).between) if s != 1.0)
    return (f"{type(model).__name__} multiplies the residual by {s:g} between blocks {i} and {i + 1}; a model that "
            "does so (RWKV in eval mode, every rescale_every blocks) also rescales its own weights in place when it "
            "changes mode, so the weights it saves depend on the mode it last ran in and a baked copy would not "
            "reload as hooked")


def _bias_flags(model: nn.Module) -> dict[str, str]:
    """``{"attn"|"mlp": config flag}`` whose ``True`` creates every block's projection bias and only biases.

    Candidates are the config's boolean attributes named ``*bias*`` that are ``False``; each is tried
    on a meta-device skeleton (no memory), so the answer is what vanilla ``from_pretrained`` will build.
    """
    cfg = config_of(model)
    have = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    need: dict[str, list[str]] = {"attn": [], "mlp": []}
    for i in range(num_layers(model)):
        bpath, _ = block_path(model, i)
        p = layer_parts(model, i)
        for part, proj in (("attn", p.attn_proj), ("mlp", p.mlp_proj)):
            if proj is not None and f"{bpath}.{proj}.bias" not in have:
                need[part].append(f"{bpath}.{proj}.bias")
    flags: dict[str, str] = {}
    # top-level flags, and those of the text config inside a multimodal one ("text_config.attention_bias")
    cands = [k for k, v in cfg.to_dict().items() if v is False and "bias" in k]
    for sub in getattr(cfg, "sub_configs", None) or {}:
        sub_cfg = getattr(cfg, sub, None)
        if sub_cfg is not None and hasattr(sub_cfg, "to_dict"):
            cands += [f"{sub}.{k}" for k, v in sub_cfg.to_dict().items() if v is False and "bias" in k]
    for flag in sorted(cands):
        new_cfg = copy.deepcopy(cfg)
        set_flag(new_cfg, flag, True)
        try:
            want = {n for n, _ in skeleton(model, new_cfg).named_parameters(remove_duplicate=False)}
        except Exception:  # noqa: BLE001 - a flag the model cannot be built with is no use
            continue
        added = want - have
        if have - want or any(not n.endswith(".bias") for n in added):
            continue
        for part, names in need.items():
            if part not in flags and names and all(n in added for n in names):
                flags[part] = flag
    return flags


def get_flag(config: Any, flag: str) -> Any:
    """``config.<flag>`` where ``flag`` may name a sub-config's attribute (``text_config.attention_bias``);
    ``None`` when absent."""
    *subs, name = flag.split(".")
    for sub in subs:
        config = getattr(config, sub, None)
    return getattr(config, name, None)


def set_flag(config: Any, flag: str, value: Any) -> None:
    """Set ``config.<flag>`` (see :func:`get_flag`)."""
    *subs, name = flag.split(".")
    for sub in subs:
        config = getattr(config, sub)
    setattr(config, name, value)


def skeleton(model: nn.Module, config: Any) -> nn.Module:
    """An empty (meta-device) model of ``type(model)`` built from ``config``: its parameter names
    are what ``from_pretrained`` will look for."""
    with torch.device("meta"):
        return type(model)(copy.deepcopy(config))


@dataclass(frozen=True)
class Loc:
    """Where a site's edit lands in the residual arithmetic.

    ``kind``: ``"embed"`` (the embedding output, i.e. ``layers.0:input``), ``"write"`` (the output
    of block ``layer``'s ``part`` writer), ``"in"`` (the input of that writer, e.g. the heads site),
    ``"resid"`` (the residual after block ``layer``: ``layers.{i}`` or ``layers.{i+1}:input``).
    ``order`` ranks hooks that fire on the same residual point (a block's output hook fires
    before the next block's input hook).
    """

    kind: Literal["embed", "write", "in", "resid"]
    layer: int | None = None
    part: Part | None = None
    order: int = 0


class _Writers(dict):
    """``{part: path}`` of the writers that resolved; looking up one that did not raises why."""

    def __init__(self, found: dict, why: dict[str, str]) -> None:
        super().__init__(found)
        self.why = why

    def __missing__(self, part: str) -> str:
        raise NotBakeableError(self.why.get(part, f"no {part} writer"))


def writer_paths(model: nn.Module, layer: int) -> dict[Part, str]:
    """Module paths (on ``model``) of block ``layer``'s attention and MLP writers: what they output is
    added to the residual. Looking up one that did not resolve (a Mamba block has no MLP) raises
    ``NotBakeableError`` saying why."""
    return _paths(model, layer, proj=False, strict=True)


def proj_paths(model: nn.Module, layer: int) -> dict[Part, str | None]:
    """Module paths of block ``layer``'s projections: edits of their *input* fold into their weights
    (the attention projection's input is the heads site). ``None`` where there is none (an MoE block)."""
    return _paths(model, layer, proj=True, strict=False)


def _paths(model: nn.Module, layer: int, proj: bool, strict: bool) -> dict:
    bpath, _ = block_path(model, layer)
    p = layer_parts(model, layer)
    out: dict = {}
    why: dict[str, str] = {}
    for part in ("attn", "mlp"):
        rel = getattr(p, f"{part}_proj") if proj else getattr(p, part)
        if rel is None and strict:
            why[part] = (f"block {layer} of {type(model).__name__}: its {part} writer did not resolve "
                         f"({p.missing.get(part, 'unknown')})")
            continue
        out[part] = None if rel is None else f"{bpath}.{rel}"
    return _Writers(out, why) if strict else out


def _between(model: nn.Module, i: int) -> float:
    """The constant block ``i + 1``'s input is block ``i``'s output times (1.0 for table families)."""
    if in_table(model):
        return 1.0
    between = discover(model).between
    return between[i] if i < len(between) else 1.0


def locate(model: nn.Module, site: Site) -> Loc:
    """Map a resolved site (canonical or a raw module path) to its residual location.

    Matching is by module identity, so a raw path naming the same module as a canonical site
    bakes the same way. Raises ``NotBakeableError`` for modules that do not write the residual.
    """
    n = num_layers(model)
    for i in range(n):
        _, block = block_path(model, i)
        if site.module is block:
            if site.side == "output":
                return Loc("resid", i, order=1)
            if i > 0 and (s := _between(model, i - 1)) != 1.0:
                raise NotBakeableError(f"site {site.name!r}: {type(model).__name__} multiplies the residual by {s:g} "
                                       f"between blocks {i - 1} and {i}, so an edit of block {i}'s input is not one "
                                       f"of block {i - 1}'s writers; bake at layers.{i - 1} instead")
            return Loc("embed") if i == 0 else Loc("resid", i - 1, order=2)
        if site.side == "output":
            for part, path in _paths(model, i, proj=False, strict=False).items():
                if path is not None and site.module is model.get_submodule(path):
                    return Loc("write", i, part)
        else:
            for part, path in proj_paths(model, i).items():
                if path is not None and site.module is model.get_submodule(path):
                    return Loc("in", i, part)
    raise NotBakeableError(
        f"site {site.name!r} ({site.module_path}:{site.side}) is not a residual-stream point or the input/output "
        "of a module writing it; only layers.{i}, layers.{i}:input, layers.{i}.attn, layers.{i}.mlp and "
        "layers.{i}.heads (or module paths naming the same modules) bake")
