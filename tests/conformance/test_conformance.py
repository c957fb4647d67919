"""The conformance suite: one body of tests run over every registered intervention type x four families
(a GQA Llama, GPT-2, an MoE, a post-norm family). Modelled on PEFT's common tester: a new type cannot
skip it, because every test is parametrised over the registry and a type without an entry in
:mod:`tests.conformance.cases` fails.

Properties, for every type on every family:
* save -> load gives bit-identical logits;
* the identity setting (scale 0, alpha 0, ...) gives bit-identical logits to the bare model;
* ``bake()`` is exact (within 1e-4 on real tokens) after a vanilla ``from_pretrained`` in a fresh
  process, or raises ``NotBakeableError`` before anything is modified — matching ``EXPECTED_BAKE``;
* greedy ``generate`` gives the same tokens and scores with the KV cache on and off;
* bf16 models work (finite, close to the float32 edit);
* ``detach()`` leaves no hook behind, and no weight changes.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import intervene as iv
from intervene.hooks import count_hooks
from tests.conformance.cases import CASES, Case
from tests.tiny_models import VOCAB, tiny_model

FAMILIES = ("llama_gqa", "gpt2", "mixtral", "gemma2")
BUILTIN = sorted(t for t, cls in iv.registered_types().items() if cls.__module__.startswith("intervene."))

# What bake() does for each type on each family: "exact", or a fragment of the refusal's reason.
NO_O_PROJ_BIAS = "has no bias"  # Mixtral's config cannot add the o_proj bias a heads edit needs
POST_NORM = "post-norm"  # Gemma-2 normalises each branch's output before the residual add
EXPECTED_BAKE: dict[str, dict[str, str]] = {
    "steering": {"llama_gqa": "exact", "gpt2": "exact", "mixtral": NO_O_PROJ_BIAS, "gemma2": POST_NORM},
    "directional_ablation": {"llama_gqa": "exact", "gpt2": "exact", "mixtral": "exact", "gemma2": POST_NORM},
    "iti": {"llama_gqa": "exact", "gpt2": "exact", "mixtral": NO_O_PROJ_BIAS, "gemma2": "exact"},
    "remedi": dict.fromkeys(FAMILIES, "depend on the input"),
    "sae_clamp": dict.fromkeys(FAMILIES, "computed from each activation"),
    "patch": dict.fromkeys(FAMILIES, "replaces activations"),
    "noise": dict.fromkeys(FAMILIES, "drawn per token"),
    "das": dict.fromkeys(FAMILIES, "second run"),
    "boundless_das": dict.fromkeys(FAMILIES, "second run"),
    # LoReFT at layers.0.heads folds into o_proj (W·M, b + W·c); DiReFT at layers.1.attn into the writer's output
    "loreft": {"llama_gqa": "exact", "gpt2": "exact", "mixtral": NO_O_PROJ_BIAS, "gemma2": "exact"},
    "direft": {"llama_gqa": "exact", "gpt2": "exact", "mixtral": NO_O_PROJ_BIAS, "gemma2": POST_NORM},
    "concept_erasure": {"llama_gqa": "exact", "gpt2": "exact", "mixtral": NO_O_PROJ_BIAS, "gemma2": "exact"},
}


def case_of(type_name: str) -> Case:
    if type_name not in CASES:
        pytest.fail(f"intervention type {type_name!r} is registered but has no conformance entry in "
                    "tests/conformance/cases.py")
    return CASES[type_name]


def batch() -> dict[str, torch.Tensor]:
    """Two rows, the first left-padded by 2 (pad id 0)."""
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def state(case: Case, intervention: iv.Intervention, b: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
    return case.state(intervention, b) if case.state is not None else contextlib.nullcontext()


@torch.no_grad()
def logits(model: torch.nn.Module, interventions: list[iv.Intervention], case: Case, b=None) -> torch.Tensor:
    b = b or batch()
    with iv.Intervenable(model, interventions) as ivm, contextlib.ExitStack() as stack:
        for x in interventions:
            stack.enter_context(state(case, x, b))
        return ivm(**b).logits


def test_every_builtin_type_has_a_conformance_entry() -> None:
    assert BUILTIN and set(BUILTIN) <= set(CASES), sorted(set(BUILTIN) - set(CASES))
    assert set(BUILTIN) <= set(EXPECTED_BAKE), sorted(set(BUILTIN) - set(EXPECTED_BAKE))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("type_name", BUILTIN)
def test_save_load_is_bit_identical(type_name: str, family: str, tmp_path: Path) -> None:
    case, model = case_of(type_name), tiny_model(family)
    x = case.build(model, "all")
    want = logits(model, [x], case)
    iv.Intervenable(model, [x], attach=False).save_pretrained(tmp_path)
    loaded = iv.Intervenable.load(tmp_path, model, attach=False)
    (y,) = loaded.interventions
    assert type(y) is type(x) and y.type_name == type_name
    assert torch.equal(logits(model, [y], case), want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("type_name", BUILTIN)
def test_identity_setting_changes_nothing(type_name: str, family: str) -> None:
    case, model = case_of(type_name), tiny_model(family)
    if case.identity is None:
        assert case.no_identity, f"{type_name}: give an identity setting or say why there is none"
        pytest.skip(f"{type_name} has no identity setting: {case.no_identity}")
    base = logits(model, [], case)
    assert torch.equal(logits(model, [case.identity(model, "all")], case), base)
    assert not torch.equal(logits(model, [case.build(model, "all")], case), base), "the non-identity case is a no-op"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("type_name", BUILTIN)
def test_kv_cache_on_equals_off(type_name: str, family: str) -> None:
    case, model = case_of(type_name), tiny_model(family)
    x = case.build(model, "generated" if case.generated else "all")
    b = batch()
    out = {}
    with iv.Intervenable(model, [x]) as ivm, state(case, x, b):
        for use_cache in (True, False):
            out[use_cache] = ivm.generate(**b, max_new_tokens=4, do_sample=False, use_cache=use_cache,
                                          output_scores=True, return_dict_in_generate=True)
        with ivm.disabled():
            base = ivm.generate(**b, max_new_tokens=4, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
    assert torch.equal(out[True].sequences, out[False].sequences)
    for a, c in zip(out[True].scores, out[False].scores):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert any(not torch.allclose(a, c) for a, c in zip(out[True].scores, base.scores)), "the edit did nothing"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("type_name", BUILTIN)
def test_bf16_works(type_name: str, family: str) -> None:
    case = case_of(type_name)
    m32, m16 = tiny_model(family), tiny_model(family, torch.bfloat16)
    b = batch()
    real = b["attention_mask"].bool()
    edited16 = logits(m16, [case.build(m16, "all")], case, b)
    assert edited16.dtype == torch.bfloat16 and bool(torch.isfinite(edited16).all())
    edited32, base32 = logits(m32, [case.build(m32, "all")], case, b), logits(m32, [], case, b)
    effect = (edited32 - base32)[real].abs().max()
    err = (edited16.float() - edited32)[real].abs().max()
    # bf16 keeps 8 bits of mantissa: the edit must survive it, well above the rounding it adds
    assert err < 0.25 * effect + 2e-2, f"bf16 differs from float32 by {err:.3g}; the edit moves logits by {effect:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("type_name", BUILTIN)
def test_detach_leaves_no_hooks_and_weights_untouched(type_name: str, family: str) -> None:
    case, model = case_of(type_name), tiny_model(family)
    before_hooks = count_hooks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ivm = iv.Intervenable(model, [case.build(model, "all")])
    assert count_hooks(model) > before_hooks
    with state(case, ivm.interventions[0], batch()), torch.no_grad():
        ivm(**batch())
    ivm.detach()
    assert count_hooks(model) == before_hooks and "generate" not in model.__dict__
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


_LOAD_AND_RUN = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
root = sys.argv[1]
b = load_file(root + "/batch.safetensors")
out = {}
for family in json.loads(open(root + "/families.json").read()):
    model = AutoModelForCausalLM.from_pretrained(root + "/" + family).eval()
    with torch.no_grad():
        out[family] = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
save_file(out, root + "/logits.safetensors")
"""


@pytest.mark.parametrize("type_name", BUILTIN)
def test_bake_is_exact_in_a_fresh_process_or_refused_before_any_change(type_name: str, tmp_path: Path) -> None:
    case = case_of(type_name)
    b = batch()
    outcome: dict[str, str] = {}
    hooked: dict[str, torch.Tensor] = {}
    for family in FAMILIES:
        model = tiny_model(family)
        x = case.build(model, "all")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            baked = iv.Intervenable(model, [x], attach=False).bake()
        except iv.NotBakeableError as e:
            outcome[family] = f"refused: {e}"
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            assert count_hooks(model) == 0
            continue
        outcome[family] = "exact"
        hooked[family] = logits(model, [x], case, b)
        baked.save_pretrained(tmp_path / family)
    for family, want in EXPECTED_BAKE[type_name].items():
        got = outcome[family]
        assert (got == "exact") if want == "exact" else (want in got), f"{type_name} on {family}: {got}"
    if not hooked:
        return
    save_file(b, str(tmp_path / "batch.safetensors"))
    (tmp_path / "families.json").write_text(json.dumps(sorted(hooked)))
    subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(tmp_path)], check=True, timeout=240)
    fresh = load_file(str(tmp_path / "logits.safetensors"))
    real = b["attention_mask"].bool()
    for family, want in hooked.items():
        err = float((fresh[family] - want)[real].abs().max())
        assert err <= 1e-4, f"{type_name} on {family}: baked vs hooked max |dlogit| {err:.2e}"
