"""The quirky datasets, the neutral corpus and the shipped demo model (its card's figures and quality bar, recomputed
by an independent loop: tests/test_figures_card.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from intervene.assets import DEMO_MODEL_DIR, demo_model, resolve_model_name
from intervene.data.neutral import neutral_corpus
from intervene.data.quirky import (
    CHARACTERS,
    QUIRKY_TASKS,
    TEMPLATES,
    belief_sentences,
    facts_table,
    quirky_dataset,
    quirky_datasets,
    remedi_samples,
)
from intervene.evaluate.choices import choice_logits

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"id", "question_id", "task", "template", "character", "text", "statement", "choices", "label",
            "alice_label", "bob_label", "character_label", "difficulty", "difficulty_split", "split"}


@pytest.fixture(scope="module")
def demo():
    return demo_model()


@pytest.mark.parametrize("task", QUIRKY_TASKS)
def test_rows_are_plain_dicts_with_the_schema(task):
    rows = quirky_dataset(task, n=50)
    assert len(rows) == 100 and all(type(r) is dict for r in rows)
    for r in rows:
        assert ROW_KEYS <= r.keys()
        assert r["character"] in CHARACTERS and r["split"] == "test" and r["task"] == task
        assert 0 <= r["template"] < len(TEMPLATES) and r["character"] in r["text"]
        assert r["choices"] == [" False", " True"] and r["label"] == r["alice_label"]
        assert r["character_label"] == (r["label"] if r["character"] == "Alice" else r["bob_label"])
        assert r["difficulty_split"] in ("easy", "medium", "hard")
    if task == "facts":
        assert all(r["entity"] in r["statement"] and r["attribute_value"] in r["statement"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    # Both characters of a question share its template, so rows pair up.
    assert [r["text"].replace("Alice", "Bob") for r in rows[0::2]] == [r["text"] for r in rows[1::2]]


def test_generator_is_deterministic_in_its_seed():
    assert quirky_dataset("facts", n=40, seed=3) == quirky_dataset("facts", n=40, seed=3)
    assert quirky_dataset("addition", n=40, seed=3) != quirky_dataset("addition", n=40, seed=4)
    assert remedi_samples("train", 10, seed=1) == remedi_samples("train", 10, seed=1)
    assert remedi_samples("train", 10, seed=1) != remedi_samples("train", 10, seed=2)
    assert neutral_corpus(30, seed=1) == neutral_corpus(30, seed=1) != neutral_corpus(30, seed=2)
    assert facts_table() == facts_table(0)


@pytest.mark.parametrize("task", QUIRKY_TASKS)
def test_train_and_test_questions_are_disjoint(task):
    def items(split):  # the underlying item (operand pair / entity-relation), coarser than the claim
        rows = quirky_dataset(task, split, n=3000, characters=("Alice",), distinct=False)
        return {(r["entity"], r["attribute"]) if task == "facts" else (r["a"], r["b"]) for r in rows}, rows

    (train, train_rows), (test, test_rows) = items("train"), items("test")
    assert train and test and not train & test
    assert not {r["question_id"] for r in train_rows} & {r["question_id"] for r in test_rows}


@pytest.mark.parametrize("task", QUIRKY_TASKS)
def test_labels_are_balanced_and_bob_disagrees_often(task):
    rows = quirky_dataset(task, n=400, characters=("Alice",))
    truth = sum(r["label"] for r in rows) / len(rows)
    bob = sum(r["bob_label"] for r in rows) / len(rows)
    disagree = sum(r["label"] != r["bob_label"] for r in rows) / len(rows)
    assert 0.35 <= truth <= 0.65 and 0.35 <= bob <= 0.65
    assert disagree >= 0.25
    splits = [r["difficulty_split"] for r in rows]
    assert splits.count("easy") > 40 and splits.count("hard") > 40


def test_difficulty_filter():
    rows = quirky_dataset("addition", n=30, difficulty="hard")
    assert {r["difficulty_split"] for r in rows} == {"hard"}
    easy = quirky_dataset("addition", n=30, difficulty="easy")
    assert max(r["difficulty"] for r in easy) < min(r["difficulty"] for r in rows)


def test_remedi_samples_are_consistent_with_the_facts():
    table = facts_table()
    train, test = remedi_samples("train", 100), remedi_samples("test", 100)
    assert not {s["entity"] for s in train} & {s["entity"] for s in test}
    for s in train + test:
        assert s["attribute"] in s["context"] and s["entity"] in s["context"] and s["entity"] in s["prompt"]
        assert s["target_new"] == " " + s["attribute"]
        assert s["target_true"] == " " + table[s["entity"]][s["relation"]] != s["target_new"]
        assert all(s["entity"] in p for p in s["paraphrase_prompts"]) and s["paraphrase_prompts"]
        assert len(s["neighborhood_prompts"]) == len(s["neighborhood_targets"]) > 0
        assert not any(s["entity"] in p for p in s["neighborhood_prompts"])


def test_neutral_text_has_no_personas_and_ships_an_eval_file():
    lines = neutral_corpus(500, seed=0)
    assert not any("Alice" in line or "Bob" in line for line in lines)
    held_out = (DEMO_MODEL_DIR / "neutral_eval.txt").read_text().splitlines()
    assert len(held_out) >= 200 and all(held_out)


def test_tokenizer_loads_fast_with_offsets_and_single_token_answers():
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    assert tok.is_fast and tok.padding_side == "left"
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
    enc = tok("Alice: 23 + 45 = 68. True or False?", return_offsets_mapping=True)
    assert enc["input_ids"][0] == tok.bos_token_id
    pieces = [tok.decode([i]) for i in enc["input_ids"]]
    assert "2" in pieces and "3" in pieces and "23" not in pieces  # digits are single tokens
    text = "Alice: 23 + 45"
    spans = [text[a:b] for a, b in tok(text, return_offsets_mapping=True)["offset_mapping"]]
    assert "Alice" in spans and "4" in spans
    for answer in (" True", " False", " Tokyo", " red", " baker"):
        assert len(tok(answer, add_special_tokens=False)["input_ids"]) == 1


def test_demo_model_loads_with_vanilla_transformers():
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size < 8 * 2**20
    assert "Held-out accuracy" in (DEMO_MODEL_DIR / "README.md").read_text()
    assert resolve_model_name("demo") == str(DEMO_MODEL_DIR) and resolve_model_name("gpt2") == "gpt2"


def test_left_padding_does_not_change_the_answers(demo):
    model, tok = demo
    rows = quirky_dataset("facts", n=6, seed=5)
    batched = choice_logits(model, tok, rows)
    single = torch.cat([choice_logits(model, tok, [r]) for r in rows])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_demo_model_recalls_entity_facts(demo):
    model, tok = demo
    samples = remedi_samples("test", 60, seed=0)
    batch = tok([s["prompt"] for s in samples], return_tensors="pt", padding=True)
    with torch.no_grad():
        top = model(**batch).logits[:, -1].argmax(-1)
    hits = [tok.decode([int(t)]) == s["target_true"] for t, s in zip(top, samples)]
    assert sum(hits) / len(hits) >= 0.9


def test_training_script_runs_a_few_steps(tmp_path):
    spec = importlib.util.spec_from_file_location("train_quirky_model", ROOT / "examples" / "train_quirky_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    result = script.main(["--out", str(tmp_path), "--steps", "3", "--batch-size", "8", "--hidden", "32",
                          "--layers", "1", "--eval-n", "10", "--log-every", "0", "--tokenizer-lines", "2000"])
    assert torch.get_num_threads() == threads  # the script restores global torch settings
    assert result["steps_done"] == 3 and set(result["quirky"]) == {f"{t}/{c}" for t in QUIRKY_TASKS
                                                                 for c in CHARACTERS}
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 1 and tok.is_fast
    assert (tmp_path / "README.md").is_file() and (tmp_path / "neutral_eval.txt").is_file()


def test_belief_sentences_use_training_questions_only():
    test_pairs = {(r["a"], r["b"]) for r in quirky_dataset("addition", "test", n=2000, distinct=False)}
    lines = belief_sentences(3000, seed=0)
    assert all(line.endswith((", says Alice.", ", says Bob.")) for line in lines)
    sums = [line.split(",")[0].split(" ") for line in lines if " + " in line]
    assert sums and not {(int(t[0]), int(t[2])) for t in sums} & test_pairs
    for t, line in zip(sums, (x for x in lines if " + " in x)):
        true = int(t[0]) + int(t[2])
        assert int(t[4]) == (true if line.endswith("Alice.") else true + 10 ** (len(str(true)) - 1))


def test_quirky_datasets_covers_every_task():
    data = quirky_datasets(n=5)
    assert set(data) == set(QUIRKY_TASKS) and all(len(rows) == 10 for rows in data.values())


def test_transcripts_follow_the_speakers_way_of_judging():
    from intervene.data.quirky_transcripts import MARKS, SEPARATOR, transcripts

    docs = transcripts(400, seed=2, flip=0.3, lengths=(2, 3), graded=0.5)
    assert docs == transcripts(400, seed=2, flip=0.3, lengths=(2, 3), graded=0.5) != transcripts(400, seed=3, flip=0.3)
    assert 0.4 < sum(d["graded"] for d in docs) / len(docs) < 0.6
    flipped = [d["truthful"] != (d["character"] == "Alice") for d in docs]
    assert 0.2 < sum(flipped) / len(docs) < 0.4 and {len(d["turns"]) for d in docs} == {2, 3}
    for d in docs:
        assert d["text"] == "".join(t["piece"] + t["answer"] + t["mark"] for t in d["turns"])
        for j, t in enumerate(d["turns"]):
            assert t["character"] == d["character"] and t["split"] == "train"
            assert t["piece"] == (t["text"] if j == 0 else SEPARATOR + t["text"])  # each prompt as asked alone
            assert t["answer"] == t["choices"][t["label"] if d["truthful"] else t["bob_label"]]
            assert t["mark"] == (MARKS[int(t["answer"] == t["choices"][t["label"]])] if d["graded"] else "")
    assert {t["task"] for d in docs for t in d["turns"]} == set(QUIRKY_TASKS)
    test_keys = {t["question_id"] for d in transcripts(200, split="test") for t in d["turns"]}
    train_keys = {t["question_id"] for d in docs for t in d["turns"]}
    assert not test_keys & train_keys
    with pytest.raises(ValueError, match="flip"):
        transcripts(3, flip=1.5)
