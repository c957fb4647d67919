"""We add and remove only our own hooks; failures leave the model clean; offload hooks keep working."""

from __future__ import annotations

import copy

import pytest
import torch

import intervene as iv
from intervene.hooks import count_hooks
from intervene.intervention import Intervention
from tests.test_positions import left_pad, steer
from tests.tiny_models import tiny_model

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15]]


class Boom(Intervention):
    type_name = "boom"

    def __init__(self, after_calls: int = 0) -> None:
        super().__init__("layers.1", "all", name="boom")
        self.calls = 0
        self.after = after_calls

    def apply(self, site, h, ctx):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom")
        return h + 1.0


def test_foreign_hooks_survive_and_still_run() -> None:
    model = tiny_model("llama")
    seen = []
    h1 = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append("fwd"))
    h2 = model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append("pre"))
    before = count_hooks(model)
    ivm = iv.Intervenable(model, steer("all", site="layers.0"))
    assert count_hooks(model) > before
    ivm(**left_pad(PROMPTS))
    assert seen == ["fwd", "pre"]
    ivm.detach()
    assert count_hooks(model) == before
    model(**left_pad(PROMPTS))
    assert seen == ["fwd", "pre", "fwd", "pre"]
    h1.remove()
    h2.remove()


def test_exception_inside_hook_leaves_zero_hooks_and_base_outputs() -> None:
    model = tiny_model("llama")
    batch = left_pad(PROMPTS)
    base = model(**batch).logits
    before = count_hooks(model)
    ivm = iv.Intervenable(model, [steer("all"), Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        ivm(**batch)
    assert count_hooks(model) == before and not ivm.attached
    assert "generate" not in model.__dict__
    assert torch.equal(model(**batch).logits, base)
    # a plain model call (not through ivm) failing inside our hook also cleans up
    ivm2 = iv.Intervenable(model, Boom())
    with pytest.raises(RuntimeError):
        model(**batch)
    assert count_hooks(model) == before and not ivm2.attached


def test_exception_mid_generate_leaves_zero_hooks() -> None:
    model = tiny_model("gpt2")
    batch = left_pad(PROMPTS)
    base = model.generate(**batch, max_new_tokens=4, do_sample=False)
    before = count_hooks(model)
    boom = Boom(after_calls=2)  # fails on the third forward, deep inside generate
    ivm = iv.Intervenable(model, boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert boom.calls == 3
    assert count_hooks(model) == before and not ivm.attached and "generate" not in model.__dict__
    assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), base)


def test_keyboard_interrupt_in_stopping_criteria_cleans_up() -> None:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Interrupt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            raise KeyboardInterrupt

    model = tiny_model("llama")
    before = count_hooks(model)
    ivm = iv.Intervenable(model, steer("generated"))
    with pytest.raises(KeyboardInterrupt):
        ivm.generate(**left_pad(PROMPTS), max_new_tokens=3, stopping_criteria=StoppingCriteriaList([Interrupt()]))
    assert count_hooks(model) == before and not ivm.attached


def test_context_manager_detaches_on_error_and_disabled_gives_base() -> None:
    model = tiny_model("llama")
    batch = left_pad(PROMPTS)
    base = model(**batch).logits
    before = count_hooks(model)
    with pytest.raises(ValueError):
        with iv.Intervenable(model, steer("all")) as ivm:
            assert not torch.equal(ivm(**batch).logits, base)
            with ivm.disabled():
                assert torch.equal(ivm(**batch).logits, base)
            assert not torch.equal(ivm(**batch).logits, base)
            raise ValueError
    assert count_hooks(model) == before


def test_detached_ivm_call_attaches_temporarily_and_attach_is_idempotent() -> None:
    model = tiny_model("llama")
    batch = left_pad(PROMPTS)
    before = count_hooks(model)
    ivm = iv.Intervenable(model, steer("all"), attach=False)
    assert count_hooks(model) == before
    edited = ivm(**batch).logits
    assert count_hooks(model) == before
    ivm.attach()
    n = count_hooks(model)
    ivm.attach()
    assert count_hooks(model) == n
    assert torch.equal(ivm(**batch).logits, edited)
    ivm.detach()
    ivm.detach()
    assert count_hooks(model) == before


def test_one_attached_intervenable_per_model() -> None:
    model = tiny_model("llama")
    a = iv.Intervenable(model, steer("all"))
    with pytest.raises(iv.InterventionError, match="already has an attached"):
        iv.Intervenable(model, steer("generated"))
    a.detach()
    b = iv.Intervenable(model, steer("generated"))
    b.detach()


def test_user_patched_generate_is_restored() -> None:
    model = copy.deepcopy(tiny_model("llama"))
    calls = []
    orig = model.generate

    def mine(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    model.generate = mine
    with iv.Intervenable(model, steer("generated")) as ivm:
        ivm.generate(**left_pad(PROMPTS), max_new_tokens=2)
    assert model.generate is mine and calls == [1]


def test_accelerate_cpu_offload_hooks_survive() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = copy.deepcopy(tiny_model("llama"))
    batch = left_pad(PROMPTS)
    with iv.Intervenable(model, steer("all")) as ivm:
        want = ivm(**batch).logits
        want_gen = ivm.generate(**batch, max_new_tokens=4, do_sample=False)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    foreign = count_hooks(model)
    assert any(hasattr(m, "_hf_hook") for m in model.modules())
    with iv.Intervenable(model, steer("all")) as ivm:
        assert torch.allclose(ivm(**batch).logits, want, atol=1e-6)
        assert torch.equal(ivm.generate(**batch, max_new_tokens=4, do_sample=False), want_gen)
    assert count_hooks(model) == foreign
    assert any(hasattr(m, "_hf_hook") for m in model.modules())


def test_gradients_flow_and_match_under_gradient_checkpointing() -> None:
    """Hooks inside a checkpointed block run again during backward; they must see the same positions."""
    model = copy.deepcopy(tiny_model("llama"))
    batch = left_pad(PROMPTS)
    v = torch.zeros(32, requires_grad=True)
    s = iv.Steering({"layers.0.mlp": torch.zeros(32)}, positions=[[1], [3]])
    calls = []
    apply = s.apply
    s.apply = lambda *a: (calls.append(1), apply(*a))[1]

    def grad(checkpointing: bool) -> tuple[torch.Tensor, int]:
        model.train()
        new_api = hasattr(model, "activation_checkpointing_enable")
        disable = model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable
        if checkpointing:
            if new_api:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        else:
            disable()
        s.vectors["layers.0.mlp"] = v
        s.invalidate()
        calls.clear()
        with iv.Intervenable(model, s) as ivm:
            out = ivm(**batch, use_cache=False).logits
            loss = out[:, -1].logsumexp(-1).sum()
            (g,) = torch.autograd.grad(loss, v)
        model.eval()
        return g, len(calls)

    (g0, n0), (g1, n1) = grad(False), grad(True)
    assert (n0, n1) == (1, 2)  # recomputed under checkpointing
    assert g0.abs().sum() > 0
    assert torch.allclose(g0, g1, atol=1e-6)
