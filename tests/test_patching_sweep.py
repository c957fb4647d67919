"""Patching sweeps equal the per-cell loop they replace (one forward per cell, plain PyTorch hooks)."""

from __future__ import annotations

import pytest
import torch

import intervene as iv
from intervene.errors import PositionsError
from intervene.methods.patching import logit_diff, sweep
from tests.test_patching import _capture, _hook
from tests.tiny_models import tiny_model

CLEAN = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15], [21, 22, 23, 24, 25]]
CORRUPT = [[5, 40, 7, 8, 9], [11, 12, 41, 14, 15], [42, 22, 23, 24, 25]]
ANSWER, WRONG = [3, 4, 10], [17, 18, 19]


def _inputs(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _metric_of(logits: torch.Tensor, pairs: list[int]) -> torch.Tensor:
    last = logits[:, -1]
    return torch.stack([last[i, ANSWER[p]] - last[i, WRONG[p]] for i, p in enumerate(pairs)])


@torch.no_grad()
def _loop(model, site: str, position: int, head: int | None, base: list[list[int]], src: list[list[int]],
          pairs: list[int] | None = None) -> float:
    """One cell by hand: capture the source site, overwrite the base site at ``position`` (and ``head``);
    the mean metric over the pairs (``pairs``: their indices into ANSWER / WRONG)."""
    out = []
    for p in range(len(base)):
        captured: dict = {}
        h = _capture(model, site, captured)
        model(**_inputs([src[p]]))
        h.remove()

        def patch(x, c=captured["x"]):
            x = x.clone()
            if head is None:
                x[0, position] = c[0, position]
            else:
                x[0, position, head] = c[0, position, head]
            return x

        h = _hook(model, site, patch)
        out.append(float(_metric_of(model(**_inputs([base[p]])).logits, [pairs[p] if pairs else p])[0]))
        h.remove()
    return sum(out) / len(out)


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2", "gemma2"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweep_equals_the_per_cell_loop(family: str, direction: str) -> None:
    model = tiny_model(family)
    res = sweep(model, _inputs(CLEAN), _inputs(CORRUPT), logit_diff(ANSWER, WRONG),
                sites=["layers.*", "layers.0.attn", "layers.1.mlp", "layers.1.heads"], direction=direction,
                batch_size=7, progress=False)
    base, src = (CORRUPT, CLEAN) if direction == "denoise" else (CLEAN, CORRUPT)
    assert res.rows == ["layers.0", "layers.1", "layers.0.attn", "layers.1.mlp"] + [f"layers.1.heads[{h}]"
                                                                                   for h in range(4)]
    assert res.positions == list(range(5))
    for i, label in enumerate(res.rows):
        site, head = (label.split("[")[0], int(label[-2])) if "[" in label else (label, None)
        for j in range(5):
            want = _loop(model, site, j, head, base, src)
            assert abs(float(res.raw[i, j]) - want) <= 1e-5, (label, j)
    with torch.no_grad():
        clean = _metric_of(model(**_inputs(CLEAN)).logits, [0, 1, 2]).mean()
        corr = _metric_of(model(**_inputs(CORRUPT)).logits, [0, 1, 2]).mean()
    assert abs(res.clean - float(clean)) < 1e-5 and abs(res.corrupted - float(corr)) < 1e-5
    torch.testing.assert_close(res.scores, (res.raw - res.corrupted) / (res.clean - res.corrupted))


def test_last_block_at_last_position_recovers_everything() -> None:
    model = tiny_model("llama_gqa")
    res = sweep(model, _inputs(CLEAN), _inputs(CORRUPT), logit_diff(ANSWER, WRONG), sites="layers.*",
                progress=False)
    assert abs(float(res.scores[-1, -1]) - 1.0) < 1e-4  # the last token's logits read only this state


def test_sweep_with_positions_from_the_end_on_prompts_of_different_lengths() -> None:
    model = tiny_model("gpt2")
    clean = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24]]
    corr = [[5, 40, 7, 8, 9], [41, 12, 13], [21, 22, 42, 24]]
    left = _pad(clean), _pad(corr)
    res = sweep(model, left[0], left[1], logit_diff(ANSWER, WRONG), sites="layers.0", positions=[-2, -1],
                progress=False)
    for j, pos in enumerate([-2, -1]):
        want = []
        for p in range(3):
            want.append(_loop(model, "layers.0", len(corr[p]) + pos, None, [corr[p]], [clean[p]], [p]))
        assert abs(float(res.raw[0, j]) - sum(want) / 3) <= 1e-5
    with pytest.raises(PositionsError, match="same number of tokens"):
        sweep(model, left[0], left[1], logit_diff(ANSWER, WRONG), sites="layers.0", progress=False)


def _pad(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask}


def test_all_positions_column_and_outputs(tmp_path) -> None:
    model = tiny_model("llama_gqa")
    res = sweep(model, _inputs(CLEAN), _inputs(CORRUPT), logit_diff(ANSWER, WRONG), sites="layers.0",
                positions="all", progress=False)
    assert res.positions == ["all"] and abs(float(res.scores[0, 0]) - 1.0) < 1e-4  # the whole state: clean run
    png = res.plot(tmp_path / "sweep.png")
    assert png.stat().st_size > 1000
    text = res.to_csv(tmp_path / "sweep.csv").read_text().splitlines()
    assert text[0] == "row,position,token,score,metric" and len(text) == 2


def test_sweep_through_an_intervenable_keeps_its_edits() -> None:
    model = tiny_model("llama_gqa")
    steer = iv.Steering({"layers.1": torch.randn(32, generator=torch.Generator().manual_seed(2))}, scale=2.0)
    ivm = iv.Intervenable(model, [steer], attach=False)
    res = sweep(ivm, _inputs(CLEAN), _inputs(CORRUPT), logit_diff(ANSWER, WRONG), sites="layers.0", progress=False)
    plain = sweep(model, _inputs(CLEAN), _inputs(CORRUPT), logit_diff(ANSWER, WRONG), sites="layers.0",
                  progress=False)
    assert not torch.allclose(res.raw, plain.raw) and ivm.interventions == [steer] and not ivm.attached
    h = _hook(model, "layers.1", lambda x: x + 2.0 * steer.vectors["layers.1"])
    try:
        want = _loop(model, "layers.0", 2, None, CORRUPT, CLEAN)
    finally:
        h.remove()
    assert abs(float(res.raw[0, 2]) - want) <= 1e-5


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_equals_the_gradient_taken_by_hand_cell_by_cell(family: str, direction: str) -> None:
    """Î(cell) = (a_source − a_base)·∇M at the base run, each cell's gradient taken by hand: one forward per
    pair and cell with a plain hook adding a leaf tensor at that cell, ``torch.autograd.grad``."""
    from intervene.methods.patching import attribution_patching

    model = tiny_model(family)
    res = attribution_patching(model, _inputs(CLEAN), _inputs(CORRUPT), logit_diff(ANSWER, WRONG),
                               sites=["layers.0", "layers.1.attn", "layers.0.heads"], direction=direction,
                               progress=False)
    base, src = (CORRUPT, CLEAN) if direction == "denoise" else (CLEAN, CORRUPT)
    base_mean = _mean_metric(model, base)
    for i, label in enumerate(res.rows):
        site, head = (label.split("[")[0], int(label[-2])) if "[" in label else (label, None)
        for j in range(5):
            est = []
            for p in range(3):
                captured: dict = {}
                h = _capture(model, site, captured)
                with torch.no_grad():
                    model(**_inputs([src[p]]))
                h.remove()
                mine: dict = {}
                h = _capture(model, site, mine)
                with torch.no_grad():
                    model(**_inputs([base[p]]))
                h.remove()
                d = captured["x"][0, j] - mine["x"][0, j]
                delta = torch.zeros_like(d, requires_grad=True)
                h = _hook(model, site, lambda x, delta=delta, j=j: _add_at(x, j, delta))
                out = _metric_of(model(**_inputs([base[p]])).logits, [p])[0]
                h.remove()
                (g,) = torch.autograd.grad(out, delta)
                prod = d * g
                est.append(float(prod[head].sum() if head is not None else prod.sum()))
            got = float(res.raw[i, j]) - base_mean
            assert abs(got - sum(est) / 3) <= 1e-5, (label, j)
    assert all(p.grad is None for p in model.parameters())


def _add_at(x: torch.Tensor, j: int, v: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, j] = x[0, j] + v
    return x


def _mean_metric(model, rows: list[list[int]]) -> float:
    with torch.no_grad():
        return float(_metric_of(model(**_inputs(rows)).logits, list(range(len(rows)))).mean())


def test_attribution_has_the_sweeps_shape_and_ranks_like_it() -> None:
    from intervene.methods.patching import attribution_patching

    model = tiny_model("llama_gqa")
    kw = dict(sites=["layers.*", "layers.1.heads"], progress=False)
    real = sweep(model, _inputs(CLEAN), _inputs(CORRUPT), logit_diff(ANSWER, WRONG), **kw)
    est = attribution_patching(model, _inputs(CLEAN), _inputs(CORRUPT), logit_diff(ANSWER, WRONG), **kw)
    assert est.rows == real.rows and est.positions == real.positions and est.scores.shape == real.scores.shape
    assert est.clean == pytest.approx(real.clean, abs=1e-5) and est.corrupted == pytest.approx(real.corrupted, abs=1e-5)
    # cells that cannot matter (positions before any corrupted token, where clean = corrupted) are exactly 0
    a = est.scores.flatten()
    b = real.scores.flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.5
