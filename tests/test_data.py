"""Templates, contrast pairs and loaders (local files, HF datasets offline, the quirky generator)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from intervene.data.contrast import ContrastPairs, make_contrast_pairs
from intervene.data.loaders import (
    DatasetUnavailableError,
    dataset_slug,
    load_dataset_rows,
    load_hf_dataset,
    load_rows,
    split_rows,
)
from intervene.data.templates import BUILTIN_TEMPLATES, Template, TemplateError, get_templates

QUESTIONS = [{"question": "the cat is red", "label": 1, "id": "q0"},
             {"question": "the dog is blue", "label": 0, "id": "q1"},
             {"question": "bob ran fast", "label": 1, "id": "q2"}]


def test_templates_render_with_answer_spans() -> None:
    t = Template("Q: {question}\nA:{answer} (by {who})", (" No", " Yes"), "mine")
    text, (a, b) = t.render({"question": "is it?", "who": "me"}, " Yes")
    assert text == "Q: is it?\nA: Yes (by me)" and text[a:b] == " Yes"
    assert Template("{text}").text == "{text}{answer}"  # the answer goes at the end by default
    with pytest.raises(TemplateError, match="needs field 'who'"):
        t.render({"question": "x"}, " No")
    with pytest.raises(TemplateError, match="more than once"):
        Template("{answer}{answer}")
    with pytest.raises(TemplateError, match="'choices'"):
        Template("{question}").choices_for({"question": "x"})
    with pytest.raises(TemplateError, match="unknown template"):
        get_templates("no_such_set")
    assert [t.name for t in get_templates(["yes_no", "{question}?"])] == ["yn_suffix", "yn_question", "yn_qa",
                                                                         "user1"]
    assert get_templates(None, [{"text": "x", "choices": ["a", "b"]}])[0].name == "row"
    assert get_templates(None, QUESTIONS) == list(BUILTIN_TEMPLATES["true_false"])


def test_question_rows_become_pairs_for_every_template() -> None:
    pairs = make_contrast_pairs(QUESTIONS, "true_false")
    n_t = len(BUILTIN_TEMPLATES["true_false"])
    assert len(pairs) == 3 * n_t and pairs.labels.tolist() == [1] * n_t + [0] * n_t + [1] * n_t
    assert pairs.question_ids[:n_t] == ["q0"] * n_t and pairs.template_ids[0] == "tf_suffix"
    for text, (a, b) in zip(pairs.x_pos_texts, pairs.pos_spans):
        assert text[a:b].strip().lower() == "true"
    for text, (a, b) in zip(pairs.x_neg_texts, pairs.neg_spans):
        assert text[a:b].strip().lower() == "false"
    assert pairs.x_pos_texts[0] == "the cat is red\nTrue or False? True"
    one = make_contrast_pairs(QUESTIONS, "true_false", per_row="one", seed=3)
    assert len(one) == 3 and one.template_ids == make_contrast_pairs(QUESTIONS, "true_false", per_row="one",
                                                                      seed=3).template_ids
    custom = make_contrast_pairs(QUESTIONS, Template("{question}. Correct?{answer}", (" no", " yes")))
    assert custom.x_neg_texts[1] == "the dog is blue. Correct? no"


def test_multiple_choice_rows_are_binarised_deterministically() -> None:
    rows = [{"question": f"pick {i}", "choices": [" a", " b", " c", " d"], "label": i % 4, "id": f"m{i}"}
            for i in range(20)]
    pairs = make_contrast_pairs(rows, "Q: {question}\nA:{answer}")
    again = make_contrast_pairs(rows, "Q: {question}\nA:{answer}")
    assert pairs.x_pos_texts == again.x_pos_texts and torch.equal(pairs.labels, again.labels)
    for i, row in enumerate(rows):
        right = "A:" + row["choices"][row["label"]]
        side = pairs.x_pos_texts[i] if pairs.labels[i] == 1 else pairs.x_neg_texts[i]
        assert side.endswith(right)
        assert pairs.x_pos_texts[i] != pairs.x_neg_texts[i]
    assert 0 < pairs.labels.sum() < 20  # both orders occur


def test_quirky_rows_go_straight_in() -> None:
    quirky = pytest.importorskip("intervene.data.quirky")
    rows = quirky.quirky_dataset("addition", split="train", n=10)
    pairs = make_contrast_pairs(rows)
    assert len(pairs) == len(rows) == 20
    assert pairs.x_pos_texts[0] == rows[0]["text"] + rows[0]["choices"][1]
    assert pairs.x_neg_texts[0] == rows[0]["text"] + rows[0]["choices"][0]
    assert pairs.labels.tolist() == [r["label"] for r in rows]
    assert pairs.template_ids[0] == f"row:{rows[0]['template']}"
    bob = pairs.where(character="Bob")
    assert len(bob) == 10 and set(bob.column("character")) == {"Bob"}
    assert bob.relabel("bob_label").labels.tolist() == [r["bob_label"] for r in rows if r["character"] == "Bob"]
    both = ContrastPairs.concat([bob, pairs.where(character="Alice")])
    assert len(both) == 20 and both.column("character")[-1] == "Alice"
    assert "question_id" in pairs.meta and "difficulty_split" in pairs.meta


def test_local_files(tmp_path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in QUESTIONS) + "\n\n")
    assert load_rows(jsonl) == QUESTIONS and load_rows(jsonl, limit=2) == QUESTIONS[:2]
    (tmp_path / "d.json").write_text(json.dumps(QUESTIONS))
    assert load_rows(tmp_path / "d.json") == QUESTIONS
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('question,label,choices,bob_label\n"a, b",1,"["" no"", "" yes""]",0\nc,0,[],1\n')
    rows = load_rows(csv_path)
    assert rows[0] == {"question": "a, b", "label": 1, "choices": [" no", " yes"], "bob_label": 0}
    assert load_rows_bool(tmp_path)[0]["label"] == 1
    with pytest.raises(DatasetUnavailableError, match="no such dataset file"):
        load_rows(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(DatasetUnavailableError, match="not valid JSON"):
        load_rows(bad)


def load_rows_bool(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps({"question": "x", "answer": True}) + "\n")
    return load_rows(p)


def test_splits_are_deterministic_and_keep_questions_together(tmp_path) -> None:
    rows = [{"question": f"q{i // 3}", "question_id": f"q{i // 3}", "label": i % 2} for i in range(300)]
    train, test = split_rows(rows, "train"), split_rows(rows, "validation")
    assert len(train) + len(test) == 300 and 30 < len(test) < 90
    assert not {r["question_id"] for r in train} & {r["question_id"] for r in test}
    assert split_rows(rows, "test") == test
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_dataset_rows(str(path), "test") == test
    sub = load_dataset_rows(str(path), "train", n=50, seed=1)
    assert len(sub) == 50 and sub == load_dataset_rows(str(path), "train", n=50, seed=1)
    marked = tmp_path / "marked.jsonl"
    marked.write_text("\n".join(json.dumps({**r, "split": "test" if i < 10 else "train"}) for i, r in enumerate(rows)))
    assert len(load_dataset_rows(str(marked), "test")) == 10
    assert dataset_slug(str(path)) == "rows" and dataset_slug("quirky:addition") == "quirky-addition"


def test_quirky_spec() -> None:
    pytest.importorskip("intervene.data.quirky")
    rows = load_dataset_rows("quirky:comparison", "test", n=7, character="Bob")
    assert len(rows) == 7 and {r["character"] for r in rows} == {"Bob"} and rows[0]["split"] == "test"
    both = load_dataset_rows("quirky:comparison", "train", n=8)
    assert {r["character"] for r in both} == {"Alice", "Bob"}


def test_hf_dataset_offline_gives_a_named_error(tmp_path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets", raising=False)
    name = "intervene-tests/definitely-not-cached"
    with pytest.raises(DatasetUnavailableError, match="definitely-not-cached") as err:
        load_hf_dataset(name, split="train")
    assert "offline" in str(err.value)
    with pytest.raises(DatasetUnavailableError, match="definitely-not-cached"):
        load_dataset_rows(name, "test")


def test_missing_datasets_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetUnavailableError, match="needs the `datasets` package"):
        load_hf_dataset("imdb")


def test_collect_pairs_over_answer_tokens() -> None:
    from intervene.activations import collect, collect_pairs
    from tests.test_collect import word_tokenizer
    from tests.tiny_models import tiny_model

    model, tok = tiny_model("llama"), word_tokenizer()
    rows = [{"question": "the cat is red", "label": 1}, {"question": "bob ran fast", "label": 0}]
    pairs = make_contrast_pairs(rows, Template("{question} answer{answer}", (" no", " yes")))
    pos, neg = collect_pairs(model, tok, pairs, "layers.0", positions="mean", span="answer", progress=False)
    assert pos.labels.tolist() == [1, 0] and pos["layers.0"].shape == (2, 32)
    last = collect(model, tok, pairs.x_neg_texts, "layers.0", progress=False)
    assert torch.equal(neg["layers.0"], last["layers.0"])  # the answer is one token: its mean is itself
