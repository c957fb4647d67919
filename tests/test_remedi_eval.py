"""REMEDI evaluation (efficacy / paraphrase / neighborhood / fluency), inspection, the CLI, and the
real effect sizes on the shipped demo model."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from intervene import Intervenable
from intervene.methods.remedi.evaluate import (
    add_neighbor_entities,
    evaluate_remedi,
    mean_ci,
    n_gram_entropy,
    score_targets,
)
from intervene.methods.remedi.inspect import attribute_scores, classification_metrics, inspect_attributes
from intervene.methods.remedi.intervention import Remedi
from tests.figure_docs import bootstrap, check
from tests.test_remedi import CITIES, ENTITIES, make_samples, make_tokenizer, random_remedi
from tests.tiny_models import tiny_model


@functools.cache
def trained() -> Remedi:
    model, tok = tiny_model("llama"), make_tokenizer()
    return Remedi.fit(model, tok, make_samples(32, seed=1, entity_last=True), layer=0, lr=0.05, epochs=4,
                      batch_size=8, patience=4, lam_kl=0.1, progress=False)


def test_n_gram_entropy_by_hand() -> None:
    # bigrams (a,b)x2 (b,a)x1 -> H2 = h(1/3); trigrams (a,b,a) (b,a,b) -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert n_gram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert n_gram_entropy("") == 0.0
    assert n_gram_entropy("x x x x x x") == 0.0  # pure repetition is not fluent


def test_mean_ci() -> None:
    ci = mean_ci([0.0, 1.0, 1.0, 1.0], n_boot=200)
    assert ci["estimate"] == 0.75 and ci["lower"] <= 0.75 <= ci["upper"] and ci["n"] == 4
    assert mean_ci([2.0, 2.0])["lower"] == mean_ci([2.0, 2.0])["upper"] == 2.0
    assert mean_ci([])["estimate"] is None


def test_score_targets_match_softmax() -> None:
    model, tok = tiny_model("gpt_neox"), make_tokenizer()
    remedi = random_remedi(scale=0.3, alpha=3.0)
    d = torch.randn(2, remedi.hidden_size, generator=torch.Generator().manual_seed(0))
    prompts, ents = ["Zor lives in", "The home city of Quil"], ["Zor", "Quil"]
    with Intervenable(model, [remedi]) as ivm:
        pa, pb = score_targets(ivm, remedi, make_tokenizer(), prompts, ents, d, [" Paris", " Rome"], [" Oslo", " Lima"])
        for i, (p, pos) in enumerate(zip(prompts, [1, 5])):
            ids = torch.tensor([tok(p)["input_ids"]])
            with torch.no_grad(), remedi.editing_with(d[i:i + 1], [pos]):
                probs = torch.softmax(ivm(input_ids=ids).logits[0, -1], -1)
            want_a = probs[tok(" Paris Rome".split()[i])["input_ids"][-1]]
            want_b = probs[tok(" Oslo Lima".split()[i])["input_ids"][-1]]
            assert pa[i].item() == pytest.approx(want_a.item(), rel=1e-5)
            assert pb[i].item() == pytest.approx(want_b.item(), rel=1e-5)


def test_evaluate_on_a_trained_tiny_editor() -> None:
    model, tok = tiny_model("llama"), make_tokenizer()
    samples = make_samples(12, seed=9, entity_last=True)
    # One neighborhood prompt that does mention the edited entity: the edit lands there and is counted.
    samples[0]["neighborhood_prompts"][0] = f"{samples[0]['entity']} lives in"
    report = evaluate_remedi(trained(), model, tok, add_neighbor_entities(samples, ENTITIES), max_new_tokens=4,
                             n_boot=100)
    ed, un = report["edited"], report["unedited"]
    # The stricter reading: the sample's direction added at the neighbor's own entity.
    assert ed["neighborhood_transfer_score"]["n"] == 12
    assert ed["neighborhood_transfer_magnitude"] != un["neighborhood_transfer_magnitude"]
    assert report["neighborhood_rows_edited"] == 1
    assert ed["efficacy_score"]["estimate"] >= 0.9 > un["efficacy_score"]["estimate"]
    assert ed["efficacy_magnitude"]["estimate"] > un["efficacy_magnitude"]["estimate"]
    assert ed["paraphrase_score"]["n"] == 12
    assert ed["neighborhood_score"]["n"] == 12 and 0.0 <= ed["neighborhood_score"]["estimate"] <= 1.0
    assert ed["neighborhood_magnitude"]["estimate"] != un["neighborhood_magnitude"]["estimate"]
    assert 0.0 <= ed["fluency"]["estimate"] and ed["fluency"]["n"] == 12
    # Without any mention of the entity, neighborhood prompts are exactly the unedited model's.
    samples[0]["neighborhood_prompts"][0] = "Vex lives in"
    again = evaluate_remedi(trained(), model, tok, samples, fluency=False, n_boot=100)
    assert "neighborhood_transfer_score" not in again["edited"]
    assert again["neighborhood_rows_edited"] == 0
    for key in ("neighborhood_score", "neighborhood_magnitude"):
        assert again["edited"][key] == again["unedited"][key]
    assert "fluency" not in again["edited"]
    assert not trained().editing


def test_full_sequence_scoring_runs() -> None:
    model, tok = tiny_model("llama"), make_tokenizer()
    samples = make_samples(4, seed=2)
    for s in samples:
        s["target_new"] += " ."
        s["target_true"] += " ."
    report = evaluate_remedi(trained(), model, tok, samples, full_sequence_targets=True, fluency=False, n_boot=50)
    assert report["full_sequence_targets"] and report["edited"]["efficacy_score"]["n"] == 4


def world_items() -> list[dict]:
    true = {e: __import__("random").Random(e).choice(CITIES) for e in ENTITIES}
    return [{"entity": e, "prompt": f"{e} lives in", "contexts": [f"{e} lives in {c} ." for c in CITIES],
             "attributes": list(CITIES), "label": CITIES.index(true[e])} for e in ENTITIES]


def test_inspection_scores_and_controls() -> None:
    model, tok = tiny_model("llama"), make_tokenizer()
    items = world_items()
    res = inspect_attributes(trained(), model, tok, items)
    assert res["n"] == len(ENTITIES) and res["chance"] == 1 / len(CITIES)
    for key in ("learned", "identity", "shuffled_labels"):
        assert 0.0 <= res[key]["accuracy"] <= 1.0 and 0.0 <= res[key]["macro_f1"] <= 1.0
    # Identity editor, no normalization: plain cosine between the entity state and the attribute state.
    from intervene.methods.remedi.states import attribute_states, layer_means, prompt_entity_tokens

    raw = attribute_scores(trained(), model, tok, items[:1], editor="identity", normalize=False)
    seqs, pos = prompt_entity_tokens(tok, [items[0]["prompt"]], [items[0]["entity"]])
    h_e = layer_means(model, 0, seqs, [list(pos[0])])
    h_a = attribute_states(model, tok, 0, items[0]["contexts"], items[0]["attributes"])
    torch.testing.assert_close(raw[0], torch.nn.functional.cosine_similarity(h_e, h_a, dim=-1))


def test_classification_metrics() -> None:
    m = classification_metrics(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 2 / 3) / 3)


def test_cli_fit_and_eval(tmp_path) -> None:
    from intervene.cli import main
    from tests.test_counterfact import rome_record

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    records = []
    for i, s in enumerate(make_samples(24, seed=5, entity_last=True)):
        rec = rome_record(i, s["entity"], s["attribute"], s["target_true"].strip())
        rec["requested_rewrite"]["prompt"] = "The home city of {}"
        rec["paraphrase_prompts"] = s["paraphrase_prompts"]
        rec["neighborhood_prompts"] = s["neighborhood_prompts"]
        rec.pop("attribute_prompts"), rec.pop("generation_prompts")
        records.append(rec)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "editor"
    rc = main(["remedi", "fit", str(model_dir), str(data), "--layer", "0", "--out", str(out), "--epochs", "2",
               "--lr", "0.02", "--batch-size", "8", "--n-eval", "6", "--max-new-tokens", "3", "--no-progress"])
    assert rc == 0
    assert {"intervene_config.json", "intervene_weights.safetensors", "README.md", "metrics.json"} <= {
        p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"] and "efficacy_score" in metrics["held_out"]["edited"]
    cfg = json.loads((out / "intervene_config.json").read_text())
    assert cfg["interventions"][0]["type"] == "remedi" and cfg["interventions"][0]["params"]["layer"] == 0
    rc = main(["remedi", "eval", str(model_dir), str(out), str(data), "--n-eval", "5", "--no-fluency",
               "--out", str(tmp_path / "eval.json")])
    assert rc == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n_samples"] == 5 and report["edited"]["efficacy_score"]["n"] == 5
    assert main(["remedi", "eval", str(model_dir), str(out), "quirky:addition"]) == 1


def test_demo_model_held_out_facts() -> None:
    """On the shipped quirky model: an editor trained on some entities edits held-out entities' facts.

    The demo model reads an entity's facts from its name's last token (the coda, which fixes every fact)
    in block 0's attention, so the edit goes at ``layers.0:input`` of that token; at ``layers.0``
    (output) or later the final position has already read the fact and efficacy stays at 0 (measured).
    """
    from intervene.assets import DEMO_MODEL_DIR, demo_model

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("the demo model has not been built")
    from intervene.data.quirky import facts_table, remedi_samples
    from intervene.methods.remedi.inspect import quirky_items

    model, tok = demo_model()
    editor = Remedi.fit(model, tok, remedi_samples("train", n=400, seed=0), layer=0, side="input", lr=3e-3,
                        epochs=20, batch_size=16, patience=2, progress=False)
    test = add_neighbor_entities(remedi_samples("test", n=48, seed=1), list(facts_table()))
    report = evaluate_remedi(editor, model, tok, test, fluency=False, n_boot=200)
    ed, un = report["edited"], report["unedited"]
    inspection = inspect_attributes(editor, model, tok, quirky_items("test"))
    print("demo REMEDI (edited, unedited):",
          {k: (round(v["estimate"], 3), round(un[k]["estimate"], 3)) for k, v in ed.items()}, inspection)
    # The README's REMEDI row (48 held-out edits): each figure within the half-width of its 95% bootstrap interval
    # over the edits (floor 3/n). Measured: efficacy 0.938 (unedited 0.000), paraphrase 0.906 (0.000),
    # neighborhood 0.917 = unedited, with the edit at the neighbor 0.035 (unedited 0.917); inspection 0.857
    # (54 of 63) against 0.159 (identity) and 0.143 (shuffled).
    for name in ("efficacy", "paraphrase", "neighborhood"):
        check(f"readme.remedi.facts.{name}", ed[f"{name}_score"]["estimate"], bootstrap(ed[f"{name}_score"], "edits"))
    check("readme.remedi.facts.transfer", ed["neighborhood_transfer_score"]["estimate"],
          bootstrap(ed["neighborhood_transfer_score"], "edits"))
    check("readme.remedi.facts.transfer_unedited", un["neighborhood_transfer_score"]["estimate"],
          bootstrap(un["neighborhood_transfer_score"], "edits"))
    # Without the edit the new attribute is never preferred (the edit, not the prompt, moves the model).
    assert un["efficacy_score"]["upper"] <= 3 / 48 and un["paraphrase_score"]["upper"] <= 3 / 48
    # "neighborhood" equals the unedited model by construction: no neighborhood prompt mentions the edited
    # entity, so the edit lands nowhere (what the README says; the transfer figure is the one that can differ).
    assert report["neighborhood_rows_edited"] == 0 and ed["neighborhood_score"] == un["neighborhood_score"]
    # Inspection: the learned editor reads the true attribute far above chance and above both controls.
    assert inspection["learned"]["accuracy"] >= 0.75
    assert inspection["learned"]["accuracy"] > max(inspection["identity"]["accuracy"],
                                                   inspection["shuffled_labels"]["accuracy"]) + 0.5
