"""Every edit equals a hand-written reference hook on the same module, per family and dtype."""

from __future__ import annotations

import pytest
import torch

import intervene as iv
from tests.test_sites import EXPECTED
from tests.tiny_models import FAMILIES, tiny_model

DTYPES = [torch.float32, torch.bfloat16]


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26], [0, 31, 32, 33, 34, 35]])
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": am}


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _with_first(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


def _ref_logits(model, path: str, side: str, fn, batch) -> torch.Tensor:
    """Logits with a plain PyTorch hook applying ``fn(h, mask)`` on non-pad tokens of ``path``."""
    mod = model.get_submodule(path)
    mask = batch["attention_mask"].bool()
    if side == "output":
        h = mod.register_forward_hook(lambda m, a, o: _with_first(o, fn(_first(o), mask)))
    else:
        def pre(m, args, kwargs):
            if args:
                return (fn(args[0], mask), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"], mask)}
        h = mod.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return model(**batch).logits
    finally:
        h.remove()


def _add(vec: torch.Tensor, scale: float):
    def fn(h, mask):
        v = (vec.float() * scale).to(h.dtype)
        m = mask.reshape(-1) if h.ndim == 2 else mask  # OPT's MLP sees [batch*seq, width]
        return torch.where(m[..., None], h + v, h)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_steering_matches_reference_at_every_site_kind(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype)
    block, attn, mlp = EXPECTED[family]
    g = torch.Generator().manual_seed(1)
    batch = _batch()
    heads = iv.resolve_site(model, "layers.1.heads").heads
    width = heads[0] * heads[1]
    cases = [
        ("layers.1", block, "output", torch.randn(32, generator=g)),
        ("layers.1:input", block, "input", torch.randn(32, generator=g)),
        ("layers.1.attn", attn, "output", torch.randn(32, generator=g)),
        ("layers.1.mlp", mlp, "output", torch.randn(32, generator=g)),
        ("layers.1.heads", attn, "input", torch.randn(width, generator=g)),
    ]
    for site, path, side, v in cases:
        vec = v.view(heads) if site.endswith("heads") else v  # per-head shape accepted
        with iv.Intervenable(model, iv.Steering({site: vec}, scale=2.5)) as ivm:
            got = ivm(**batch).logits
        want = _ref_logits(model, path, side, _add(v, 2.5), batch)
        assert torch.equal(got, want), f"{family} {site}: max diff {(got - want).abs().max()}"
        assert not torch.equal(got, model(**batch).logits), f"{family} {site}: the edit did nothing"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "falcon", "mixtral"])
def test_directional_ablation_matches_reference(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype)
    block = EXPECTED[family][0]
    r = torch.randn(32, generator=torch.Generator().manual_seed(2))
    unit = r / r.norm()
    batch = _batch()
    for value in (None, 1.5):
        def fn(h, mask, value=value):
            u = unit.to(h.dtype)
            proj = h @ u
            coef = proj if value is None else proj - value
            return torch.where(mask[..., None], h - coef[..., None] * u, h)
        with iv.Intervenable(model, iv.DirectionalAblation({"layers.1": r}, value=value)) as ivm:
            got = ivm(**batch).logits
        want = _ref_logits(model, block, "output", fn, batch)
        assert torch.equal(got, want)


def test_ablation_removes_the_component() -> None:
    model = tiny_model("llama")
    r = torch.randn(32)
    seen = {}
    with iv.Intervenable(model, iv.DirectionalAblation({"layers.0": r}, value=3.0)):
        # registered after ours, so it sees the edited output
        h = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o.detach()))
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    h.remove()
    proj = seen["h"] @ (r / r.norm())
    assert torch.allclose(proj, torch.full_like(proj, 3.0), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_noop_is_bit_identical(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family, dtype)
    batch = _batch()
    base = model(**batch).logits
    zero = iv.Steering({"layers.*": torch.zeros(32)}, scale=4.0, name="zero")
    off = iv.Steering({"layers.0.mlp": torch.randn(32)}, scale=0.0, name="off")
    with iv.Intervenable(model, [zero, off]) as ivm:
        assert torch.equal(ivm(**batch).logits, base)
        gen = ivm.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, model.generate(**batch, max_new_tokens=4, do_sample=False))


def test_interventions_compose_in_order() -> None:
    model = tiny_model("llama")
    batch = _batch()
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    r = torch.randn(32, generator=torch.Generator().manual_seed(4))
    steer = iv.Steering({"layers.0": v}, scale=3.0)
    abl = iv.DirectionalAblation({"layers.0": r})
    u = r / r.norm()

    def both(h, mask):
        h = torch.where(mask[..., None], h + 3.0 * v, h)
        return torch.where(mask[..., None], h - (h @ u)[..., None] * u, h)

    with iv.Intervenable(model, [steer, abl]) as ivm:
        got = ivm(**batch).logits
    assert torch.equal(got, _ref_logits(model, "model.layers.0", "output", both, batch))
    with iv.Intervenable(model, [abl, steer]) as ivm:
        assert not torch.allclose(ivm(**batch).logits, got)


def test_scale_change_takes_effect_and_devices_dtypes_untouched() -> None:
    model = tiny_model("llama")
    before = {k: (p.dtype, p.device, p.data_ptr()) for k, p in model.named_parameters()}
    v = torch.randn(32, dtype=torch.float64)  # any float dtype; cast lazily to the activation's
    steer = iv.Steering({"layers.0": v}, scale=1.0)
    batch = _batch()
    with iv.Intervenable(model, steer) as ivm:
        a = ivm(**batch).logits
        steer.scale = 2.0
        b = ivm(**batch).logits
    assert not torch.equal(a, b)
    assert before == {k: (p.dtype, p.device, p.data_ptr()) for k, p in model.named_parameters()}


def test_from_probe_uses_direction() -> None:
    class FakeProbe:
        direction_ = torch.stack([torch.zeros(32), torch.ones(32) / 32 ** 0.5])

    s = iv.Steering.from_probe(FakeProbe(), "layers.0", scale=2.0, index=1)
    assert torch.allclose(s.vectors["layers.0"], torch.ones(32) / 32 ** 0.5)
    with pytest.raises(iv.InterventionError, match="index"):
        iv.Steering.from_probe(FakeProbe(), "layers.0")
    a = iv.DirectionalAblation.from_probe(FakeProbe(), "layers.*", index=1)
    assert a.sites == ["layers.*"]


@pytest.mark.parametrize("bad", [
    lambda: iv.Steering({"layers.0": torch.randn(31)}),
    lambda: iv.Steering({"layers.0.heads": torch.randn(3, 8)}),
])
def test_shape_mismatch_is_named_error(bad) -> None:
    with pytest.raises(iv.InterventionError, match="shape"):
        iv.Intervenable(tiny_model("llama"), bad())


def test_bad_construction_errors() -> None:
    with pytest.raises(iv.InterventionError):
        iv.Steering(torch.randn(32))  # no sites
    with pytest.raises(iv.InterventionError):
        iv.Steering({"layers.0": torch.randn(32)}, name="has.dot")
    with pytest.raises(iv.InterventionError):
        iv.DirectionalAblation({"layers.0": torch.zeros(32)})
    m = tiny_model("llama")
    with pytest.raises(iv.InterventionError, match="unique"):
        iv.Intervenable(m, [iv.Steering({"layers.0": torch.randn(32)}), iv.Steering({"layers.1": torch.randn(32)})])
    with pytest.raises(iv.SiteError):
        iv.Intervenable(m, iv.Steering({"layers.9": torch.randn(32)}))
