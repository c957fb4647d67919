"""Choosing a steering scale (intervene/methods/steering/scale.py) and refusing vectors of the wrong shape."""

from __future__ import annotations

import math

import pytest
import torch

import intervene as iv
from intervene.methods.steering import activation_norm, choose_scale, scale_sweep
from tests.test_collect import TEXTS, word_tokenizer
from tests.tiny_models import tiny_model


def test_activation_norm_is_the_mean_norm_of_real_tokens_after_the_first() -> None:
    model, tok = tiny_model("llama"), word_tokenizer("left")
    got = activation_norm(model, tok, TEXTS, "layers.0", batch_size=4)
    want = []
    for text in TEXTS:  # one text at a time: no padding to leave out
        ids = tok([text], return_tensors="pt")
        with torch.no_grad():
            h = model(**ids, output_hidden_states=True).hidden_states[1][0]  # block 0 output (the last is normed)
        want += h[1:].norm(dim=-1).tolist()
    assert tok.padding_side == "left"  # restored
    assert got == pytest.approx(sum(want) / len(want), rel=1e-5)


def test_scale_sweep_reports_effect_and_cost_and_restores_the_scale() -> None:
    model, tok = tiny_model("llama"), word_tokenizer("left")
    steer = iv.Steering({"layers.1": torch.ones(32)}, scale=7.0)
    probe_ids = tok(["the cat sat"], return_tensors="pt")

    def logit0(m) -> float:
        with torch.no_grad():
            return float(m(**probe_ids).logits[0, -1, 5])

    rows = scale_sweep(model, tok, steer, [0.0, 1.0, 4.0], logit0, TEXTS)
    assert [r["scale"] for r in rows] == [0.0, 1.0, 4.0] and steer.scale == 7.0
    assert rows[0]["ce_delta"] == 0.0 and rows[2]["kl"] > rows[1]["kl"] > 0
    assert rows[0]["effect"] == pytest.approx(logit0(model)) and rows[2]["effect"] != rows[0]["effect"]
    assert math.isnan(scale_sweep(model, tok, steer, [1.0], logit0)[0]["ce_delta"])  # no texts: cost not measured


def test_choose_scale_takes_the_smallest_scale_with_most_of_the_gain_within_budget() -> None:
    rows = [{"scale": 0.0, "effect": 0.2, "ce_delta": 0.0}, {"scale": 5.0, "effect": 0.5, "ce_delta": 0.1},
            {"scale": 10.0, "effect": 0.95, "ce_delta": 0.4}, {"scale": 20.0, "effect": 1.0, "ce_delta": 0.45},
            {"scale": 40.0, "effect": 1.0, "ce_delta": 3.0}]
    assert choose_scale(rows)["scale"] == 10.0  # 0.95 >= 0.2 + 0.9 * (1.0 - 0.2)
    assert choose_scale(rows, max_ce_delta=0.2)["scale"] == 5.0
    with pytest.raises(ValueError, match="every scale costs more"):
        choose_scale(rows[1:], max_ce_delta=0.01)


def test_a_vector_with_a_batch_dimension_is_refused_with_a_hint() -> None:
    model = tiny_model("llama")
    with pytest.raises(iv.InterventionError, match=r"shape \(1, 32\).*drop the leading dimension"):
        iv.Intervenable(model, iv.Steering({"layers.1": torch.ones(1, 32)}))
    with pytest.raises(iv.InterventionError, match=r"shape \(2, 16\)"):
        iv.Intervenable(model, iv.Steering({"layers.1": torch.ones(2, 16)}))
    heads = model.config.num_attention_heads
    for v in (torch.ones(32), torch.ones(heads, 32 // heads)):  # a head site takes [n_heads, head_dim] or flat
        iv.Intervenable(model, iv.Steering({"layers.1.heads": v})).detach()
