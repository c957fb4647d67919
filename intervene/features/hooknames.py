"""TransformerLens hook names (used by SAELens) translated to intervene sites, with TransformerLens's semantics.

TransformerLens (``components/transformer_block.py``) computes, in a pre-norm block ``i``::

    resid_pre  = block input                                  -> layers.{i}:input
    attn_out   = what attention adds to the residual          -> layers.{i}.attn
    resid_mid  = resid_pre + attn_out                         -> <block>.<mlp norm>:input   (needs the model)
    mlp_in     = resid_mid (a clone, when use_hook_mlp_in)    -> the same as resid_mid
    ln2.hook_normalized = (resid_mid - mean) / sqrt(var + eps) for LayerNorm, resid_mid / rms for RMSNorm:
                 the MLP norm's output *before* its gain and bias -> <block>.<mlp norm> plus an exact fold of
                 the norm's affine map into the SAE (see :func:`norm_affine`)
    mlp_out    = what the MLP adds to the residual            -> layers.{i}.mlp
    resid_post = resid_mid + mlp_out = block output           -> layers.{i}
    attn.hook_z = per-head attention result, [n_heads, d_head] -> layers.{i}.heads

Where a block is parallel (GPT-J, Phi, Falcon, Pythia's GPT-NeoX) TransformerLens has no ``resid_mid`` and its
``hook_mlp_in`` is ``resid_pre``; where the norms come after the sublayers (OLMo-2) ``ln2`` normalizes the MLP's
output, so ``ln2.hook_normalized`` is not an MLP input and is refused.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from intervene.errors import SAEFormatError

_TL = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_resid_mid|hook_mlp_out|hook_attn_out|"
                 r"hook_mlp_in|attn\.hook_z|ln2\.hook_normalized)$")
_FIXED = {"hook_resid_post": "layers.{}", "hook_resid_pre": "layers.{}:input", "hook_mlp_out": "layers.{}.mlp",
          "hook_attn_out": "layers.{}.attn", "attn.hook_z": "layers.{}.heads"}
_NEEDS_MODEL = ("hook_resid_mid", "hook_mlp_in", "ln2.hook_normalized")
_OURS = re.compile(r"^layers\.\d+(?::input|\.attn|\.mlp|\.heads)?$")
TL_HOOKS = tuple(f"blocks.{{i}}.{h}" for h in (*_FIXED, *_NEEDS_MODEL))

# The norm in front of the MLP, relative to a block, per config.model_type (pre-norm families only).
_MLP_NORM = {
    **{t: "post_attention_layernorm" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo",
                                               "granite", "mixtral", "qwen2_moe", "qwen3_moe", "bloom",
                                               "gpt_neox")},
    "gpt2": "ln_2", "opt": "final_layer_norm", "gemma2": "pre_feedforward_layernorm",
    "gemma3_text": "pre_feedforward_layernorm",
}
_PARALLEL = ("gptj", "phi", "falcon")
_POST_NORM = ("olmo2",)


@dataclass(frozen=True)
class HookSite:
    """Where a TransformerLens hook lives on a HF model: ``site`` (ours or a raw module path with its side) and,
    for ``ln2.hook_normalized``, the norm module whose affine map must be folded into the SAE."""

    site: str
    norm: nn.Module | None = None


def site_from_hook_name(hook: str | None, model: nn.Module | None = None) -> str | None:
    """Our site name for a TransformerLens hook name (``blocks.6.hook_resid_post`` -> ``layers.6``), a sparsify
    hookpoint (``layers.6``, ``layers.6.mlp``) or one of our own names; ``None`` when it cannot be translated.

    ``resid_mid``, ``hook_mlp_in`` and ``ln2.hook_normalized`` name module paths that depend on the model's
    family: they translate only given ``model`` (``ln2.hook_normalized`` then also needs a fold, which
    :func:`hook_site` returns and the SAE loader applies)."""
    if not hook:
        return None
    try:
        found = hook_site(hook, model)
    except SAEFormatError:
        return None
    return None if found is None else found.site


def hook_site(hook: str, model: nn.Module | None = None) -> HookSite | None:
    """The :class:`HookSite` of ``hook``; ``None`` for names that are not TransformerLens / sparsify / ours.

    Raises ``SAEFormatError`` when the hook is a TransformerLens name that this model (or no model) cannot express.
    """
    if _OURS.match(hook):
        return HookSite(hook)
    m = _TL.match(hook)
    if m is None:
        return None
    layer, kind = int(m.group(1)), m.group(2)
    if kind in _FIXED:
        return HookSite(_FIXED[kind].format(layer))
    if model is None:
        raise SAEFormatError(f"the TransformerLens hook {hook!r} is a module path that depends on the model's "
                             "family: pass model=... to load_sae")
    from intervene.sites import block_path

    mtype = getattr(getattr(model, "config", None), "model_type", None)
    bpath, block = block_path(model, layer)
    parallel = mtype in _PARALLEL or (mtype == "gpt_neox" and getattr(model.config, "use_parallel_residual", False)) \
        or (mtype == "falcon" and getattr(model.config, "parallel_attn", True))
    if kind == "hook_mlp_in" and parallel:  # TransformerLens: the MLP reads resid_pre in parallel blocks
        return HookSite(f"layers.{layer}:input")
    if parallel:
        raise SAEFormatError(f"{hook!r}: {mtype} blocks run attention and the MLP in parallel, so TransformerLens "
                             "has no resid_mid / ln2 input for them")
    if mtype in _POST_NORM:
        if kind == "ln2.hook_normalized":
            raise SAEFormatError(f"{hook!r}: {mtype} normalizes the MLP's output (post-norm), not its input")
        return HookSite(f"{bpath}.mlp:input")
    norm_name = _MLP_NORM.get(mtype)
    if mtype == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        norm_name = None
    if norm_name is None or not hasattr(block, norm_name):
        raise SAEFormatError(f"{hook!r}: no known pre-MLP norm for model_type {mtype!r}; pass site=... "
                             "(a module path such as 'model.layers.3.post_attention_layernorm:input')")
    if kind == "ln2.hook_normalized":
        return HookSite(f"{bpath}.{norm_name}", norm=block.get_submodule(norm_name))
    return HookSite(f"{bpath}.{norm_name}:input")


@torch.no_grad()
def norm_affine(norm: nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, b)`` ``[width]`` each (float64) such that ``norm(x) = normalized(x) * w + b``, where ``normalized`` is
    TransformerLens's ``hook_normalized`` (LayerNorm: centred and divided by ``sqrt(var + eps)``; RMSNorm: divided
    by ``sqrt(mean(x^2) + eps)``).

    ``nn.LayerNorm`` gives its parameters; for an RMS norm a probe decides whether its gain is ``weight`` (Llama)
    or ``1 + weight`` (Gemma), so an unknown norm is refused rather than guessed.
    """
    if isinstance(norm, nn.LayerNorm):
        w = norm.weight.double() if norm.weight is not None else torch.ones(width, dtype=torch.float64)
        b = norm.bias.double() if norm.bias is not None else torch.zeros(width, dtype=torch.float64)
        return w.detach().cpu(), b.detach().cpu()
    eps = getattr(norm, "variance_epsilon", None)
    eps = getattr(norm, "eps", None) if eps is None else eps
    if eps is None:
        raise SAEFormatError(f"cannot fold {type(norm).__name__}: it is neither nn.LayerNorm nor an RMS norm "
                             "with an eps / variance_epsilon")
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (width,) or getattr(norm, "bias", None) is not None:
        raise SAEFormatError(f"cannot fold {type(norm).__name__}: it has no per-channel gain of width {width}")
    # The gain is the weight (Llama) or 1 + weight (Gemma); which one is measured on a probe. Norms may compute in
    # float32 whatever the input, so the probe tells the forms apart but the gain returned is the parameter's.
    probe = copy.deepcopy(norm).to("cpu", torch.float32)
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0)) + 0.5
    n = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + float(eps))
    y = probe(x).double()
    w = weight.detach().to("cpu", torch.float64)
    for gain in (w, 1.0 + w):
        if torch.allclose(y, n * gain, rtol=1e-4, atol=1e-6):
            return gain, torch.zeros(width, dtype=torch.float64)
    raise SAEFormatError(f"{type(norm).__name__} is not an RMS norm with gain weight or 1 + weight; cannot fold it")
