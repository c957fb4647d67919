"""Exact weight baking: write interventions into a copy of the model's weights (docs/architecture.md, "Baking").

>>> baked = bake(model, [steer])   # a plain PreTrainedModel, no hooks; model is untouched (= ivm.bake())
>>> baked.save_pretrained("dir")   # loads with vanilla AutoModelForCausalLM.from_pretrained

What bakes (positions must be ``"all"``; any other edit raises ``NotBakeableError`` with the reason):

* ``Steering`` at ``layers.{i}`` / ``layers.{i+1}:input``: ``scale·v`` goes into the bias of block i's
  last residual writer (MLP down projection, ``c_proj``, ``dense_4h_to_h``, ``fc2``, ``fc_out``); in
  parallel blocks (GPT-J, NeoX, Falcon) into whichever writer has a bias. Missing biases are created
  through the family's config flag (``mlp_bias`` / ``attention_bias`` on Llama, ``bias`` on Falcon,
  ``enable_bias`` on OPT), so vanilla ``from_pretrained`` loads them; families without one refuse.
* ``Steering`` at ``layers.{i}.attn`` / ``.mlp``: that writer's bias (or its parallel partner's).
* ``Steering`` at ``layers.{i}.heads`` (ITI's shift ``d`` at the o_proj input): ``b_o += W_o·d``.
* ``Steering`` at ``layers.0:input``: every row of the token embedding (divided by the family's
  embedding scale, Gemma's ``sqrt(hidden)``); tied unembeddings are untied first.
* ``DirectionalAblation`` at writer outputs / inputs: ``W <- (I - r rᵀ) W, b <- (I - r rᵀ) b (+ value·r)``
  or ``W <- W (I - r rᵀ)`` (``value`` needs a bias).
* ``ConceptErasure`` (LEACE, ``x ↦ (I - L R) x + L R μ``) at a linear layer's input (``layers.{i}.heads``):
  ``W <- W (I - L R), b <- b + W L R μ``; at a writer's output ``W <- (I - L R) W, b <- (I - L R) b + L R μ``.
  Residual points refuse: the skip connection carries the activation past every writer.
* ``DirectionalAblation`` (``value=None``, one unit ``r``) whose sites include residual points: the
  weights are orthogonalised so the residual stream never has a component along ``r`` — the
  embedding (and learned position embedding) ``E <- E - (E r) rᵀ`` and every attention/MLP writer
  ``W <- W - r (rᵀ W), b <- b - r (rᵀ b)`` of every block. This equals the hooked model exactly
  when the hooks already keep every point some module reads free of ``r``: each block's input,
  in sequential blocks the MLP's input (the residual after attention), and the final norm's
  input — e.g. ``sites=["layers.*:input", "layers.*.attn", "layers.*"]`` (Arditi et al.'s
  pre/mid/post ablation) or ``["layers.0:input", "layers.*.attn", "layers.*.mlp"]``. Coverage
  is checked, and such an ablation must be the only intervention baked.

Equality is on real tokens: hooks with ``positions="all"`` skip left padding, the baked weights do
not, but no real token attends to a padding position.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from intervene.bake.editor import BakeReport, WeightEditor
from intervene.bake.layout import LAYOUTS, Layout, Loc, layout_of, locate, register_layout
from intervene.errors import NotBakeableError
from intervene.intervention import Intervention, resolve
from intervene.registry import method_spec

__all__ = ["LAYOUTS", "BakeReport", "Layout", "Loc", "WeightEditor", "bake", "bake_with_report", "clean_copy",
           "layout_of", "locate", "register_layout", "require_all_positions"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def bake(model: nn.Module, interventions: Sequence[Intervention]) -> nn.Module:
    """A deep copy of ``model`` with every intervention written into its weights, no hooks.

    ``model`` itself is never modified. Raises ``NotBakeableError`` (before copying anything) when
    some edit is not exact as weights; each type's baker (or refusal) comes from its registration.
    """
    return bake_with_report(model, interventions)[0]


def bake_with_report(model: nn.Module, interventions: Sequence[Intervention]) -> tuple[nn.Module, BakeReport]:
    """:func:`bake`, plus a :class:`BakeReport` of the parameters and config flags it changed."""
    interventions = list(interventions)
    specs = [method_spec(iv.type_name) for iv in interventions]
    for iv, spec in zip(interventions, specs):
        if spec.bake is None:  # a type that never bakes says why before anything about the model
            spec.baker()(iv, {}, None)
    resolved = resolve(model, interventions)  # binds every intervention: shapes are validated
    plan = [(iv, spec.baker()) for iv, spec in zip(interventions, specs)]
    editor = WeightEditor(model, n_interventions=len(interventions))
    for iv, fn in plan:
        fn(iv, resolved[iv.name], editor)
        editor.report.interventions.append({"name": iv.name, "type": iv.type_name, "sites": list(resolved[iv.name]),
                                            "params": iv.params()})
    editor.plan()  # every refusal happens here, before the model is copied
    baked = clean_copy(model)
    report = editor.finish(baked)
    return baked, report


def require_all_positions(iv: Intervention) -> None:
    """Refuse edits that are not applied at every position: weights cannot tell positions apart."""
    if iv.positions.kind != "all":
        raise NotBakeableError(
            f"{iv.name} ({iv.type_name}): positions={iv.positions.to_json()!r}; weights act on every token "
            "alike, so only positions='all' bakes")


def clean_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with no hooks and no patched ``generate`` (the original keeps its own)."""
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise NotBakeableError("the model is dispatched or offloaded by accelerate (device_map); load it on one "
                               "device to bake it")
    new = copy.deepcopy(model)
    for m in new.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks:
                hooks.clear()
        # transformers installs its output-capturing hooks lazily; let it reinstall them on the copy
        m.__dict__.pop("_output_capturing_hooks_installed", None)
    gen = new.__dict__.get("generate")
    if gen is not None and hasattr(gen, "__intervene__"):
        del new.__dict__["generate"]
    return new
