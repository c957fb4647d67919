"""MC1 / MC2, choice accuracy and CE/KL side effects against hand computations on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from intervene import Intervenable, Steering
from intervene.evaluate.mc import (
    choice_accuracy,
    continuation_logprobs,
    mc1,
    mc2,
    truthfulness,
    truthfulqa_mc,
)
from intervene.evaluate.side_effects import side_effects
from intervene.methods.iti.intervention import ITI
from tests.test_iti import char_tokenizer
from tests.tiny_models import tiny_model

ROWS = [
    {"question": "What is 2 plus 2?",
     "mc1_targets": {"choices": ["4", "5", "22"], "labels": [1, 0, 0]},
     "mc2_targets": {"choices": ["4", "four", "5", "22"], "labels": [1, 1, 0, 0]}},
    {"question": "Is ice cold?",
     "mc1_targets": {"choices": ["Yes, it is", "No"], "labels": [1, 0]},
     "mc2_targets": {"choices": ["Yes, it is", "No", "Never"], "labels": [1, 0, 0]}},
    {"question": "Which is bigger, 3 or 7?",
     "mc1_targets": {"choices": ["7", "3", "Neither"], "labels": [1, 0, 0]},
     "mc2_targets": {"choices": ["7", "3", "Neither", "Seven"], "labels": [1, 0, 0, 1]}},
]


def _hand_score(model, tok, prompt: str, answer: str) -> float:
    """Summed log-probs of the answer's tokens given the prompt, one unpadded sequence at a time."""
    p = tok(prompt)["input_ids"]
    a = tok(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(a))


def test_mc1_mc2_match_hand_computation():
    model, tok = tiny_model("llama"), char_tokenizer()
    res = truthfulqa_mc(model, tok, ROWS, batch_size=3)
    mc1s, mc2s = [], []
    for row in ROWS:
        prompt = f"Q: {row['question']}\nA:"
        s1 = [_hand_score(model, tok, prompt, c) for c in row["mc1_targets"]["choices"]]
        correct = s1[row["mc1_targets"]["labels"].index(1)]
        mc1s.append(float(correct > max(s for s, lab in zip(s1, row["mc1_targets"]["labels"]) if not lab)))
        s2 = [_hand_score(model, tok, prompt, c) for c in row["mc2_targets"]["choices"]]
        probs = [math.exp(s) for s in s2]
        mc2s.append(sum(p for p, lab in zip(probs, row["mc2_targets"]["labels"]) if lab) / sum(probs))
    assert [r["mc1"] for r in res["per_row"]] == mc1s
    for got, want in zip((r["mc2"] for r in res["per_row"]), mc2s):
        assert abs(got - want) < 1e-5
    assert abs(res["mc1"] - sum(mc1s) / 3) < 1e-12 and abs(res["mc2"] - sum(mc2s) / 3) < 1e-5
    assert truthfulness(model, tok, ROWS) == {"mc1": res["mc1"], "mc2": res["mc2"]}


def test_continuation_logprobs_batched_equals_unbatched():
    model, tok = tiny_model("gpt2"), char_tokenizer()
    prompts = ["Q: a\nA:", "Q: a much longer question here\nA:", "Q: b\nA:"]
    conts = [" yes", " no, certainly not", " x"]
    got = continuation_logprobs(model, tok, prompts, conts, batch_size=2)
    want = torch.tensor([_hand_score(model, tok, p, c[1:]) for p, c in zip(prompts, conts)], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


def test_metric_definitions():
    assert mc1([-1.0, -2.0, -3.0], [1, 0, 0]) == 1.0
    assert mc1([-2.0, -2.0], [1, 0]) == 0.0  # ties count as wrong, as TruthfulQA's ">" does
    assert mc1([-3.0, -2.0], [1, 0]) == 0.0
    s = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert abs(mc2(s, [1, 0, 1]) - 0.7) < 1e-12
    assert abs(mc2([-1000.0, -1001.0], [1, 0]) - 1 / (1 + math.exp(-1))) < 1e-12  # stable for tiny probs
    with pytest.raises(ValueError):
        mc1([0.0, 1.0], [1, 1])


def test_choice_accuracy_on_quirky_style_rows():
    model, tok = tiny_model("llama_gqa"), char_tokenizer()
    rows = [{"text": f"Alice: {a} + 1 = {a + 1 + (a % 2)}. True or False?", "choices": [" False", " True"],
             "label": int(a % 2 == 0)} for a in range(6)]
    res = choice_accuracy(model, tok, rows)
    want = []
    for r in rows:  # multi-token answers with this tokenizer: each choice's full summed log-prob
        scores = [_hand_score(model, tok, r["text"], c[1:]) for c in r["choices"]]
        want.append(int(scores[1] > scores[0]) == r["label"])
    assert res["accuracy"] == sum(want) / len(want) and res["scores"].shape == (6, 2)


def test_side_effects_noop_and_hand_computation():
    model, tok = tiny_model("llama_gqa"), char_tokenizer()
    texts = ["the cat sat on the mat.", "a b", "numbers 1 2 3 4 5 6 7"]
    zero = side_effects(model, tok, texts, Steering({"layers.0": torch.zeros(32)}), batch_size=2)
    assert zero["kl"] == 0.0 and zero["ce"] == zero["ce_base"] and zero["n_tokens"] == sum(len(t) - 1 for t in texts)
    g = torch.Generator().manual_seed(0)
    iti = ITI([(0, 1), (1, 2)], torch.randn(2, 8, generator=g), torch.ones(2), alpha=30.0, positions="last")
    res = side_effects(model, tok, texts, iti, batch_size=2)  # measured at positions="all"
    assert iti.positions.kind == "last"  # restored afterwards
    ce_b = ce_e = kl = 0.0
    n = 0
    full = ITI(iti.heads, iti.directions_, iti.sigma_, alpha=30.0, normalize=False)
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            lb = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            with Intervenable(model, [full]) as ivm:
                le = torch.log_softmax(ivm(input_ids=ids).logits[0, :-1].double(), -1)
        tgt = ids[0, 1:]
        ce_b -= float(lb[torch.arange(len(tgt)), tgt].sum())
        ce_e -= float(le[torch.arange(len(tgt)), tgt].sum())
        kl += float((lb.exp() * (lb - le)).sum())
        n += len(tgt)
    assert res["n_tokens"] == n
    for key, want in (("ce_base", ce_b / n), ("ce", ce_e / n), ("kl", kl / n)):
        assert abs(res[key] - want) < 1e-5, key
    assert res["kl"] > 0 and abs(res["ce_delta"] - (res["ce"] - res["ce_base"])) < 1e-12
