"""The demo model's card and the demo SAE's cfg.json, recomputed from the weights by code that did not write them.

examples/train_quirky_model.py scored the card with intervene's ``choice_logits`` (left-padded batches) and
examples/train_demo_sae.py its SAE figures inside its training loop. Here an independent loop scores each prompt:
batches padded on the right (every real token at its own position), the logits of each answer's first token at
the prompt's last real token; the SAE is applied with hand-written top-k arithmetic. The samples are the ones
the card names (its generators and seeds: data, not evaluation code). Bounds: two binomial standard errors of an
accuracy on the card's n questions (3/n when it is 0 or 1), two standard errors of a mean over texts or tokens.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from intervene.assets import DEMO_MODEL_DIR, demo_model
from intervene.data.quirky import QUIRKY_TASKS, RELATIONS, VALUES, fact_prompts, quirky_dataset, world
from intervene.data.quirky_transcripts import MARKS, transcripts
from tests.figure_docs import ROOT, binomial, check, exact, mean_of

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")
BAR = 0.95  # the quality bar the demo model was trained to: both characters, every task and split
N = 1000  # the card's questions per task (--eval-n 1000), transcripts n // 2


@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    return demo_model()


@torch.no_grad()
def answers(model: Any, tok: Any, rows: Sequence[dict[str, Any]], batch: int = 256) -> list[int]:
    """The index of the choice each row's prompt makes most likely next (right padding, own loop)."""
    encoded = tok([r["text"] for r in rows])["input_ids"]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))  # batches of similar lengths: little padding
    out = [0] * len(rows)
    first: dict[tuple[str, ...], list[int]] = {}  # each answer's first token, per choice list
    for start in range(0, len(rows), batch):
        chunk = order[start:start + batch]
        ids = [encoded[i] for i in chunk]
        width = max(map(len, ids))
        x = torch.full((len(ids), width), tok.pad_token_id)
        mask = torch.zeros_like(x)
        for i, seq in enumerate(ids):
            x[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
        hidden = model.model(input_ids=x, attention_mask=mask).last_hidden_state  # the LM head only where it is read
        logits = model.lm_head(hidden[torch.arange(len(ids)), mask.sum(1) - 1])
        for i, lg in zip(chunk, logits):
            key = tuple(rows[i]["choices"])
            if key not in first:
                first[key] = [tok(c, add_special_tokens=False)["input_ids"][0] for c in key]
            out[i] = int(lg[first[key]].argmax())
    return out


def _acc(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


@pytest.mark.parametrize("task", QUIRKY_TASKS)
def test_quirky_accuracy_table(demo: tuple[Any, Any], task: str) -> None:
    """The card's held-out accuracy table (1000 questions per task, each asked of both characters; Alice scored
    against the truth, Bob against his systematic error) and the README's first row, which quotes it."""
    model, tok = demo
    rows = quirky_dataset(task, "test", n=N, seed=1234)
    pred = answers(model, tok, rows)
    for who, target in (("Alice", "label"), ("Bob", "bob_label")):
        mine = [(r, p) for r, p in zip(rows, pred) if r["character"] == who]
        subsets = {"all": mine, "truth": mine, "disagree": [(r, p) for r, p in mine if r["label"] != r["bob_label"]],
                   **{s: [(r, p) for r, p in mine if r["difficulty_split"] == s] for s in ("easy", "medium", "hard")}}
        for split, sel in subsets.items():
            acc = _acc([p == r["label" if split == "truth" else target] for r, p in sel])
            check(f"card.quirky.{task}_{who.lower()}.{split}", acc, binomial(acc, len(sel)))
            if split != "truth":
                assert acc >= BAR, (task, who, split, acc)
        acc = _acc([p == r[target] for r, p in mine])
        check(f"readme.demo.card.{task}.{who.lower()}", acc, binomial(acc, len(mine)))
    # Bob really departs from the truth where his belief differs from it (what elicitation must undo).
    bob = [p != r["label"] for r, p in zip(rows, pred) if r["character"] == "Bob" and r["label"] != r["bob_label"]]
    assert len(bob) >= 200 and _acc(bob) >= BAR


def _task_mix() -> dict[str, float]:
    """The task mix the card's transcripts were drawn with: TASK_MIX of the training script (read, not run)."""
    tree = ast.parse((ROOT / "examples" / "train_quirky_model.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "TASK_MIX")
    return ast.literal_eval(node.value)


def test_transcripts(demo: tuple[Any, Any]) -> None:
    """The card's transcripts table (500 held-out transcripts of 3 turns, half of them flipped) and the README's
    "0.997 once revealed" that quotes it: the first turn scored against the name's way, later turns against the
    speaker's actual way, split by whether an earlier turn revealed it; and the grader's mark after each answer."""
    model, tok = demo
    mix = _task_mix()
    rows, kinds = [], []
    for doc in transcripts(N // 2, seed=4321, split="test", flip=0.5, lengths=(3,), task_weights=mix):
        flipped = doc["truthful"] != (doc["character"] == "Alice")
        text, revealed = "", False
        for j, turn in enumerate(doc["turns"]):
            if j == 0:
                kind, target = "first", turn["label"] if doc["character"] == "Alice" else turn["bob_label"]
            else:
                kind = ("revealed_" if revealed else "hidden_") + ("flipped" if flipped else "named")
                target = turn["label"] if doc["truthful"] else turn["bob_label"]
            rows.append({"text": text + turn["piece"], "choices": turn["choices"], "target": target})
            kinds.append(kind)
            text += turn["piece"] + turn["answer"]
            revealed = revealed or turn["label"] != turn["bob_label"]
    graded = transcripts(N // 2, seed=4322, split="test", flip=0.5, lengths=(3,), task_weights=mix, graded=1.0)
    for doc in graded:
        text = ""
        for turn in doc["turns"]:
            text += turn["piece"] + turn["answer"]
            rows.append({"text": text, "choices": list(MARKS), "target": MARKS.index(turn["mark"])})
            kinds.append("mark")
            text += turn["mark"]
    pred = answers(model, tok, rows)
    for kind in ("first", "revealed_named", "revealed_flipped", "hidden_named", "hidden_flipped", "mark"):
        hits = [p == r["target"] for r, p, k in zip(rows, pred, kinds) if k == kind]
        check(f"card.transcripts.{kind}", _acc(hits), binomial(_acc(hits), len(hits)))
        if kind == "revealed_flipped":
            check("readme.card.revealed", _acc(hits), binomial(_acc(hits), len(hits)))


def test_fact_recall_and_neutral_ce(demo: tuple[Any, Any]) -> None:
    """Fact recall (argmax over the relation's values after every phrasing of every entity) and the mean
    next-token cross-entropy per token on the shipped neutral_eval.txt."""
    model, tok = demo
    w = world()
    for relation in RELATIONS:
        choices = [" " + v for v in VALUES[relation]]
        rows = [{"text": p, "choices": choices, "target": VALUES[relation].index(w.facts[e][relation])}
                for e in w.entities for p in fact_prompts(e, relation)]
        hits = [p == r["target"] for r, p in zip(rows, answers(model, tok, rows))]
        check(f"card.fact_recall.{relation}", _acc(hits), binomial(_acc(hits), len(hits)))
    lines = (DEMO_MODEL_DIR / "neutral_eval.txt").read_text().splitlines()
    per_line = []  # (nats summed over the line's predicted tokens, their number)
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([tok(line)["input_ids"]])
            nll = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="sum")
            per_line.append((float(nll), ids.shape[1] - 1))
    tokens = sum(n for _, n in per_line)
    ce = sum(s for s, _ in per_line) / tokens
    # Each line weighs by its tokens: the noise is that of a ratio of sums, two SE of its linearisation.
    mean_n = tokens / len(per_line)
    check("card.neutral.ce", ce, mean_of([(s - ce * n) / mean_n + ce for s, n in per_line], "neutral lines"))


def test_demo_sae_cfg(demo: tuple[Any, Any]) -> None:
    """The SAE's training figures in cfg.json, on the tokens it names (demo_corpus, seed 1000, rows of 64):
    FVU, mean L0 and the share of latents that never fire, with top-k applied by hand."""
    from intervene.cli.features import demo_corpus
    from intervene.features import load_sae, token_rows

    model, tok = demo
    sae = load_sae("demo", model=model)
    rows = token_rows(demo_corpus(60000, seed=1000), tok, 64, 60000)
    check("sae.tokens", rows.numel(), exact("a count of the corpus's tokens: no noise"))
    layer = int(sae.site.split(".")[1])
    with torch.no_grad():
        h = torch.cat([model(input_ids=rows[i:i + 64].long(), output_hidden_states=True).hidden_states[layer + 1]
                       .reshape(-1, model.config.hidden_size)
                       for i in range(0, rows.shape[0], 64)])
        w_enc, b_enc, w_dec, b_dec = (getattr(sae, n).detach().float() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
        pre = torch.relu((h - b_dec) @ w_enc + b_enc)
        vals, idx = pre.topk(sae.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals)
        err = (h - z @ w_dec - b_dec).pow(2).sum(1)
        var = (h - h.mean(0)).pow(2).sum(1)
    fvu = float(err.mean() / var.mean())
    # FVU is a ratio of means over tokens: two SE of its linearisation (tokens of one row are correlated, so this
    # understates the noise a little; the rows are many).
    check("sae.fvu", fvu, mean_of(((err - fvu * var) / var.mean() + fvu).tolist(), "tokens"))
    l0 = (z > 0).sum(1).float()
    check("sae.l0", float(l0.mean()), mean_of(l0.tolist(), "tokens"))
    dead = float(((z > 0).sum(0) == 0).float().mean())
    check("sae.dead_fraction", dead, binomial(dead, z.shape[1]))
