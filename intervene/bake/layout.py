"""How each family writes its residual stream: the facts exact baking relies on.

Baking turns an edit of an activation into an edit of the weights that produce it. That is exact
only where we know the block's arithmetic: ``out = x + attn(...) + mlp(...)`` with the MLP reading
``x + attn`` (sequential) or ``x`` (parallel), and which config flag (if any) gives a writer a bias
that vanilla ``from_pretrained`` will load. Families are listed only once checked against their
``transformers`` source (5.x) and the property tests; anything else is refused with a reason.

Residual points used below: ``embed`` (what block 0 reads), and for block ``i`` its attention and
MLP *writers* (the modules whose outputs are added to the residual) and ``post_i`` (its output).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from intervene.errors import NotBakeableError
from intervene.sites import Site, block_path, family_of, num_layers

Part = Literal["attn", "mlp"]


def _opt_refusal(model: nn.Module) -> str | None:
    if not getattr(model.config, "do_layer_norm_before", True):
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
    """

    parallel: bool | Callable[[object], bool] = False
    bias_flags: Mapping[str, str] = field(default_factory=dict)
    pos_embed: str | None = None
    embed_refusal: str | Callable[[nn.Module], str | None] | None = None
    refusal: Callable[[nn.Module], str | None] | None = None

    def is_parallel(self, config: object) -> bool:
        return bool(self.parallel(config) if callable(self.parallel) else self.parallel)

    def embed_problem(self, model: nn.Module) -> str | None:
        r = self.embed_refusal
        return r(model) if callable(r) else r


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
    """The :class:`Layout` of ``model``; raises ``NotBakeableError`` for families not checked."""
    mtype = getattr(model.config, "model_type", None)
    lay = LAYOUTS.get(mtype)
    if lay is None:
        raise NotBakeableError(
            f"baking is not verified for model_type {mtype!r} (verified: {', '.join(sorted(LAYOUTS))}); "
            "intervene.bake.register_layout() teaches it one once its block arithmetic is checked")
    fam = family_of(model)
    if fam.attn_writer or fam.mlp_writer:
        raise NotBakeableError(f"{mtype}: attention/MLP outputs pass through a norm before the residual "
                               "(post-norms), which no bias or projection of the writer reproduces")
    if lay.refusal is not None and (why := lay.refusal(model)):
        raise NotBakeableError(why)
    return lay


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


def writer_paths(model: nn.Module, layer: int) -> dict[Part, str]:
    """Module paths (on ``model``) of block ``layer``'s attention and MLP writers."""
    fam = family_of(model)
    bpath, _ = block_path(model, layer)
    return {"attn": f"{bpath}.{fam.attn_out}", "mlp": f"{bpath}.{fam.mlp_out}"}


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
            return Loc("embed") if i == 0 else Loc("resid", i - 1, order=2)
        for part, path in writer_paths(model, i).items():
            if site.module is model.get_submodule(path):
                return Loc("write" if site.side == "output" else "in", i, part)
    raise NotBakeableError(
        f"site {site.name!r} ({site.module_path}:{site.side}) is not a residual-stream point or the input/output "
        "of a module writing it; only layers.{i}, layers.{i}:input, layers.{i}.attn, layers.{i}.mlp and "
        "layers.{i}.heads (or module paths naming the same modules) bake")
