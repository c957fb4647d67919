"""The CounterFact loader (ROME's format, written by the tests) and its subject-disjoint split."""

from __future__ import annotations

import json

import pytest

from intervene.data.counterfact import counterfact_sample, load_counterfact, split_samples


def rome_record(case_id: int, subject: str, new: str, true: str, extra: bool = True) -> dict:
    rec = {
        "case_id": case_id,
        "pararel_idx": 100 + case_id,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                              "target_new": {"str": new, "id": "Q1860"}, "target_true": {"str": true, "id": "Q150"},
                              "subject": subject},
        "paraphrase_prompts": [f"Shayna does this. {subject} is a native speaker of"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Montesquieu spoke the language"],
    }
    if extra:
        rec["attribute_prompts"] = ["J. R. R. Tolkien is a native speaker of"]
        rec["generation_prompts"] = [f"{subject}'s mother tongue is"]
    return rec


def test_loads_rome_records_as_remedi_samples(tmp_path) -> None:
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([rome_record(0, "Danielle Darrieux", "English", "French"),
                                rome_record(1, "Edwin of Northumbria", "Dutch", "English", extra=False)]))
    a, b = load_counterfact(path)
    assert a["entity"] == "Danielle Darrieux"
    assert a["prompt"] == "The mother tongue of Danielle Darrieux is"
    assert a["context"] == "The mother tongue of Danielle Darrieux is English."
    assert a["attribute"] == "English" and a["attribute"] in a["context"]
    assert (a["target_new"], a["target_true"]) == (" English", " French")
    assert a["paraphrase_prompts"] == ["Shayna does this. Danielle Darrieux is a native speaker of"]
    assert a["neighborhood_prompts"][0] == "The mother tongue of Léon Blum is"
    assert a["neighborhood_targets"] == [" French", " French"]  # CounterFact neighbors share the true object
    assert a["generation_prompts"] == ["Danielle Darrieux's mother tongue is"]
    assert a["attribute_prompts"] and a["id"] == 0 and a["relation"] == "P103"
    assert "generation_prompts" not in b and b["target_new"] == " Dutch"
    assert load_counterfact(path, n=1) == [a]


def test_json_lines_and_multi_rewrite_records(tmp_path) -> None:
    path = tmp_path / "cf.jsonl"
    multi = rome_record(2, "A", "English", "French")
    second = dict(multi["requested_rewrite"], subject="B", target_new={"str": "Latin"})
    multi["requested_rewrite"] = [multi["requested_rewrite"], second]
    path.write_text("\n".join(json.dumps(r) for r in (rome_record(0, "C", "Greek", "Dutch"), multi)) + "\n")
    samples = load_counterfact(path)
    assert [s["entity"] for s in samples] == ["C", "A", "B"]
    assert samples[2]["target_new"] == " Latin" and samples[2]["paraphrase_prompts"] == multi["paraphrase_prompts"]


def test_missing_target_true_is_allowed() -> None:
    rec = rome_record(0, "X", "English", "French")
    del rec["requested_rewrite"]["target_true"]
    s = counterfact_sample(rec)
    assert s["target_true"] is None and s["neighborhood_targets"] == []


def test_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_counterfact(tmp_path / "nope.json")
    bad = rome_record(0, "X", "English", "French")
    bad["requested_rewrite"]["prompt"] = "no slot here"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([rome_record(1, "Y", "Greek", "Latin"), bad]))
    with pytest.raises(ValueError, match=r"record 1: .*\{\}"):
        load_counterfact(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="neither JSON"):
        load_counterfact(path)
    rec = rome_record(0, "X", "", "French")
    with pytest.raises(ValueError, match="target_new"):
        counterfact_sample(rec)


def test_split_keeps_subjects_on_one_side() -> None:
    samples = [counterfact_sample(rome_record(i, f"S{i % 7}", "English", "French")) for i in range(30)]
    train, test = split_samples(samples, test_fraction=0.3, seed=1)
    assert len(train) + len(test) == 30 and test and train
    assert not {s["entity"] for s in train} & {s["entity"] for s in test}
    assert split_samples(samples, 0.3, seed=1) == (train, test)
