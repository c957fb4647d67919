"""Patch, Noise and interchange against hand-written two-run references (plain PyTorch hooks)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import intervene as iv
from intervene.errors import InterventionError, PositionsError
from intervene.hooks import count_hooks
from intervene.sites import resolve_site
from tests.tiny_models import tiny_model

FAMILIES = ["llama_gqa", "gpt2", "mixtral", "gemma2"]
SITES = ["layers.0", "layers.1:input", "layers.0.attn", "layers.1.mlp", "layers.0.heads"]


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _with_first(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


def _view(model, site: str, h: torch.Tensor, b: int, t: int) -> torch.Tensor:
    s = resolve_site(model, site)
    if h.ndim == 2:
        h = h.view(b, t, -1)
    return h.view(b, t, *s.heads) if s.heads else h


def _hook(model, site: str, fn):
    """A plain PyTorch hook at ``site`` calling ``fn(h3) -> new h3`` (h3 = [batch, seq, *site_shape])."""
    s = resolve_site(model, site)

    def edit(h):
        b, t = h.shape[0], h.shape[1] if h.ndim > 2 else None
        shape = h.shape
        if h.ndim == 2:  # OPT-style flattened tokens never occur in these families
            raise AssertionError("unexpected flattened activation")
        return fn(_view(model, site, h, b, t)).reshape(shape)

    if s.side == "output":
        return s.module.register_forward_hook(lambda m, a, o: _with_first(o, edit(_first(o))))

    def pre(m, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    return s.module.register_forward_pre_hook(pre, with_kwargs=True)


def _capture(model, site: str, out: dict):
    """A hook that stores the activation at ``site`` (``[batch, seq, *site]``) in ``out["x"]``."""

    def keep(x):
        out["x"] = x.clone()
        return x

    return _hook(model, site, keep)


@torch.no_grad()
def _states(model, site: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One run of ``model`` on ``batch``: the activation at ``site`` (``[batch, seq, *site]``), by a hand hook."""
    captured: dict = {}
    h = _capture(model, site, captured)
    try:
        model(**batch)
    finally:
        h.remove()
    return captured["x"]


def _batch(rows: list[list[int]], side: str = "left") -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    # position ids over real tokens, as generate (and interchange) use them: padding shifts nothing
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}


def _cols(batch, i: int) -> list[int]:
    return batch["attention_mask"][i].nonzero().flatten().tolist()


BASE = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18, 19]]
SOURCE = [[21, 22, 23], [24, 25, 26, 27, 28, 29, 30], [31, 32, 33, 34]]


@torch.no_grad()
def _reference_interchange(model, base, source, site, base_pos, src_pos, heads=None):
    """Two runs by hand: capture the source site, then overwrite the base site at the mapped columns."""
    src = _states(model, site, source)

    def patch(x):
        x = x.clone()
        for i in range(x.shape[0]):
            bcols, scols = _cols(base, i), _cols(source, i)
            for p, q in zip(base_pos[i], src_pos[i]):
                if heads is None:
                    x[i, bcols[p]] = src[i, scols[q]]
                else:
                    x[i, bcols[p], heads] = src[i, scols[q], heads]
        return x

    h = _hook(model, site, patch)
    try:
        return model(**base).logits
    finally:
        h.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_interchange_equals_two_runs_by_hand(family: str, site: str) -> None:
    model = tiny_model(family)
    base, source = _batch(BASE), _batch(SOURCE, side="right")  # different lengths and padding sides
    base_pos = [[-1, 1], [0, 2], [3, -2]]
    src_pos = [[2, 0], [-1, 4], [1, 1]]
    want = _reference_interchange(model, base, source, site, [[p % len(r) for p in ps] for ps, r in zip(base_pos, BASE)],
                                  [[q % len(r) for q in qs] for qs, r in zip(src_pos, SOURCE)])
    hooks = count_hooks(model)
    with torch.no_grad():
        got = iv.interchange(model, base, source, site, positions=base_pos, source_positions=src_pos).logits
        plain = model(**base).logits
    real = base["attention_mask"].bool()
    assert (got - want)[real].abs().max() <= 1e-6
    assert (got - plain)[real].abs().max() > 1e-4, "the interchange changed nothing"
    assert count_hooks(model) == hooks


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_interchange_of_a_heads_subset(family: str) -> None:
    model = tiny_model(family)
    base, source = _batch(BASE), _batch(SOURCE)
    pos = [[-1]] * 3
    want = _reference_interchange(model, base, source, "layers.1.heads",
                                  [[len(r) - 1] for r in BASE], [[len(r) - 1] for r in SOURCE], heads=[0, 2])
    with torch.no_grad():
        got = iv.interchange(model, base, source, "layers.1.heads", positions=pos, heads=[0, 2]).logits
        full = iv.interchange(model, base, source, "layers.1.heads", positions=pos).logits
    real = base["attention_mask"].bool()
    assert (got - want)[real].abs().max() <= 1e-6
    assert (got - full)[real].abs().max() > 1e-5


def test_subspace_interchange_patches_only_the_span() -> None:
    model = tiny_model("llama_gqa")
    base, source = _batch(BASE), _batch(SOURCE)
    d = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    q = torch.linalg.qr(d.T).Q.T  # orthonormal rows spanning d

    src = _states(model, "layers.0", source)

    def patch(x):
        x = x.clone()
        for i in range(3):
            bc, sc = _cols(base, i)[-1], _cols(source, i)[-1]
            x[i, bc] = x[i, bc] + ((src[i, sc] - x[i, bc]) @ q.T) @ q
        return x

    h = _hook(model, "layers.0", patch)
    with torch.no_grad():
        want = model(**base).logits
    h.remove()
    with torch.no_grad():
        got = iv.interchange(model, base, source, "layers.0", positions=[-1], directions=d).logits
    assert (got - want)[base["attention_mask"].bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_interchange_under_generate_is_exact_with_and_without_cache(family: str) -> None:
    model = tiny_model(family)
    base, source = _batch(BASE), _batch(SOURCE)
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    outs = {c: iv.interchange(model, base, source, "layers.0", positions=[-1, 0], generate={**kw, "use_cache": c})
            for c in (True, False)}
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    for a, b in zip(outs[True].scores, outs[False].scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the first generated token's scores are the patched forward's last-token logits
    with torch.no_grad():
        first = iv.interchange(model, base, source, "layers.0", positions=[-1, 0]).logits[:, -1]
    torch.testing.assert_close(outs[True].scores[0], first, atol=1e-5, rtol=1e-5)


def test_interchange_composes_with_an_intervenable_and_restores_it() -> None:
    model = tiny_model("llama_gqa")
    base, source = _batch(BASE), _batch(SOURCE)
    steer = iv.Steering({"layers.1": torch.randn(32, generator=torch.Generator().manual_seed(1))}, scale=3.0)
    ivm = iv.Intervenable(model, [steer])
    with torch.no_grad():
        got = iv.interchange(ivm, base, source, "layers.0", positions=[-1]).logits
    assert ivm.attached and ivm.interventions == [steer]
    ivm.detach()
    # reference: both runs with the steering hook, plus the patch
    s = _hook(model, "layers.1", lambda x: x + 3.0 * steer.vectors["layers.1"])
    src = _states(model, "layers.0", source)

    def patch(x):
        x = x.clone()
        for i in range(3):
            x[i, _cols(base, i)[-1]] = src[i, _cols(source, i)[-1]]
        return x

    h = _hook(model, "layers.0", patch)
    with torch.no_grad():
        want = model(**base).logits
    h.remove()
    s.remove()
    assert (got - want)[base["attention_mask"].bool()].abs().max() <= 1e-6


def test_interchange_refuses_mismatched_inputs() -> None:
    model = tiny_model("llama_gqa")
    base, source = _batch(BASE), _batch(SOURCE[:2])
    with pytest.raises(InterventionError, match="rows"):
        iv.interchange(model, base, source, "layers.0")
    with pytest.raises(PositionsError, match="outside"):
        iv.interchange(model, base, _batch(SOURCE), "layers.0", positions=[6])
    with pytest.raises(InterventionError, match="pair element by element"):
        iv.interchange(model, base, _batch(SOURCE), "layers.0", positions=[[0], [1], [2]],
                       source_positions=[[0], [1, 2], [0]])


def test_zero_and_mean_ablation_match_hand_references() -> None:
    model = tiny_model("gpt2")
    base = _batch(BASE)
    real = base["attention_mask"].bool()
    sites = {"layers.0.mlp": resolve_site(model, "layers.0.mlp")}
    pool = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    mean = iv.Patch.mean({"layers.0.mlp": pool})
    zero = iv.Patch.zero(sites, positions=[-1])
    for patch, fn in ((mean, lambda x: torch.where(real[..., None], pool.mean(0), x)),
                      (zero, lambda x: _last_set(x, base, torch.zeros(32)))):
        h = _hook(model, "layers.0.mlp", fn)
        with torch.no_grad():
            want = model(**base).logits
        h.remove()
        with torch.no_grad(), iv.Intervenable(model, [patch]) as ivm:
            got = ivm(**base).logits
        assert (got - want)[real].abs().max() <= 1e-6


def _last_set(x, batch, v):
    x = x.clone()
    for i in range(x.shape[0]):
        x[i, _cols(batch, i)[-1]] = v
    return x


def test_per_example_values_resample_rows_and_cannot_be_saved(tmp_path) -> None:
    model = tiny_model("llama_gqa")
    base = _batch(BASE)
    pool = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    perm = [2, 0, 1]
    patch = iv.Patch({"layers.1": pool[perm]}, positions="last", per_example=True)
    h = _hook(model, "layers.1", lambda x: _rows_set(x, base, pool[perm]))
    with torch.no_grad():
        want = model(**base).logits
    h.remove()
    with torch.no_grad(), iv.Intervenable(model, [patch]) as ivm:
        got = ivm(**base).logits
    assert (got - want)[base["attention_mask"].bool()].abs().max() <= 1e-6
    with pytest.raises(InterventionError, match="run-time only"):
        iv.Intervenable(model, [patch], attach=False).save_pretrained(tmp_path)


def _rows_set(x, batch, vals):
    x = x.clone()
    for i in range(x.shape[0]):
        x[i, _cols(batch, i)[-1]] = vals[i]
    return x


def test_noise_is_seeded_per_token_and_scaled() -> None:
    model = tiny_model("llama_gqa")
    base = _batch(BASE)
    noise = iv.Noise("layers.0:input", scale=0.5, positions=[0, 1], seed=7)
    captured: dict = {}
    with torch.no_grad(), iv.Intervenable(model, [noise]) as ivm:
        h = _capture(model, "layers.0:input", captured)  # registered after ours: sees the noisy input
        ivm(**base)
        h.remove()
    delta = captured["x"] - _states(model, "layers.0:input", base)
    for i in range(3):
        cols = _cols(base, i)
        for p in (0, 1):
            torch.testing.assert_close(delta[i, cols[p]], 0.5 * noise.draw("layers.0:input", 3, p)[i])
        assert delta[i, cols[2:]].abs().max() == 0
    assert not torch.equal(delta[0, _cols(base, 0)[0]], delta[1, _cols(base, 1)[0]])  # examples differ


def test_patch_validates_shapes_and_heads() -> None:
    model = tiny_model("llama_gqa")
    hooks = count_hooks(model)  # transformers may have installed its own output-capturing hooks already
    with pytest.raises(InterventionError, match="shape"):
        iv.Intervenable(model, [iv.Patch({"layers.0": torch.zeros(31)})])
    with pytest.raises(InterventionError, match="heads"):
        iv.Intervenable(model, [iv.Patch({"layers.0": torch.zeros(32)}, heads=[0])])
    with pytest.raises(InterventionError, match="has 4 heads"):
        iv.Intervenable(model, [iv.Patch({"layers.0.heads": torch.zeros(4, 8)}, heads=[4])])
    with pytest.raises(InterventionError, match="not finite"):
        iv.Patch({"layers.0": torch.full((32,), float("nan"))})
    assert count_hooks(model) == hooks


def test_pyvene_vanilla_interchange_gives_the_same_logits() -> None:
    pv = pytest.importorskip("pyvene")
    logging.disable(logging.WARNING)
    try:
        model = copy.deepcopy(tiny_model("gpt2"))  # pyvene removes every hook on a model it wraps
        base = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 14, 15]])}
        source = {"input_ids": torch.tensor([[21, 22, 23, 24, 25], [31, 32, 33, 34, 35]])}
        for layer, comp, site in ((1, "block_output", "layers.1"), (0, "mlp_output", "layers.0.mlp"),
                                  (1, "attention_output", "layers.1.attn")):
            cfg = pv.IntervenableConfig(representations=[{"layer": layer, "component": comp, "unit": "pos",
                                                          "max_number_of_units": 1}],
                                        intervention_types=pv.VanillaIntervention)
            pvm = pv.IntervenableModel(cfg, model)
            with torch.no_grad():
                _, theirs = pvm(base, [source], {"sources->base": ([[[3]] * 2], [[[2]] * 2])})
                ours = iv.interchange(model, base, source, site, positions=[2], source_positions=[3]).logits
            assert torch.equal(ours, theirs.logits), site
            assert (ours - model(**base).logits).abs().max() > 1e-4
    finally:
        logging.disable(logging.NOTSET)


def test_resample_draws_rows_from_the_pool_and_derange_moves_every_row() -> None:
    pool = torch.arange(5 * 32, dtype=torch.float32).view(5, 32)
    p = iv.Patch.resample({"layers.1": pool}, n_examples=5, seed=3, derange=True)
    rows = [int(v[0]) // 32 for v in p.values["layers.1"]]
    assert sorted(rows) == list(range(5)) and all(r != i for i, r in enumerate(rows))
    q = iv.Patch.resample({"layers.1": pool}, n_examples=8, seed=3)
    assert q.values["layers.1"].shape == (8, 32) and q.per_example
    assert torch.equal(q.values["layers.1"], iv.Patch.resample({"layers.1": pool}, 8, seed=3).values["layers.1"])


def test_record_can_stop_after_its_last_site() -> None:
    from intervene.methods.patching.record import record

    model = tiny_model("llama_gqa")
    base = _batch(BASE)
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        full, out = record(model, base, ["layers.0", "layers.0.heads"])
        early, none = record(model, base, ["layers.0", "layers.0.heads"], stop_early=True)
    finally:
        h.remove()
    assert out is not None and none is None and len(calls) == 1  # the stopped run never reached the LM head
    assert all(torch.equal(full[k], early[k]) for k in full)
