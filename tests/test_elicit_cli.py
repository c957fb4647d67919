"""The elicit / eval / sweep / plot commands, run in-process on a tiny saved model (and the demo model)."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from intervene.cli import main
from intervene.elicit import EVAL_COLUMNS, ElicitConfig, elicit, read_csv
from tests.test_collect import word_tokenizer
from tests.tiny_models import tiny_model

SUBJECTS = ["the cat", "the dog", "a mat", "bob", "alice", "the big dog", "a small cat"]
COLOURS = ["red", "blue"]


def _rows(n: int, seed: int) -> list[dict]:
    """Statements 'X is red/blue' (red is true); Alice tells the truth, Bob flips it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject, colour = rng.choice(SUBJECTS), rng.choice(COLOURS)
        truth = int(colour == "red")
        character = "alice" if i % 2 == 0 else "bob"
        rows.append({"question": f"{character} says {subject} is {colour}", "label": truth, "id": f"{seed}-{i}",
                     "character": character.capitalize(), "alice_label": truth, "bob_label": 1 - truth})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("elicit")
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    word_tokenizer("left").save_pretrained(model_dir)
    jsonl = root / "colours.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in _rows(120, 0)) + "\n")
    with (root / "more.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(_rows(1, 1)[0]))
        writer.writeheader()
        writer.writerows(_rows(60, 1))
    return {"root": root, "model": str(model_dir), "jsonl": str(jsonl), "csv": str(root / "more.csv")}


def test_elicit_writes_a_run_folder(files, capsys) -> None:
    out = files["root"] / "run-lr"
    code = main(["elicit", files["model"], files["jsonl"], "--net", "lr", "--layers", "0", "1",
                 "--max-examples", "60", "30", "--n-bootstrap", "200", "--out", str(out), "--no-progress",
                 "--templates", "true_false"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["net"] == "lr" and config["layers"] == [0, 1] and config["features"] == "diff"
    assert config["n_train"] == 60 * 4 and config["base_model"]["model_type"] == "llama"  # 4 templates per row
    assert (out / "probes" / "layers.1" / "probe.json").is_file()
    rows = read_csv(out / "eval.csv")
    assert list(rows[0]) == list(EVAL_COLUMNS) and [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 <= r["auroc_lower"] <= r["auroc"] <= r["auroc_upper"] <= 1 and 0 <= r["ece"] <= 1
    assert "held-out metrics" in capsys.readouterr().out

    # transfer: the run's probes on Bob's rows, scored against what Bob says
    assert main(["eval", str(out), files["model"], files["csv"], "--character", "Bob", "--against", "character",
                 "--no-progress"]) == 0
    transfer = read_csv(out / "eval_more_Bob_character.csv")
    assert [r["layer"] for r in transfer] == [0, 1]

    assert main(["plot", str(out)]) == 0
    png = out / "auroc_by_layer.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("net", ["mean-diff", "lda", "ccs", "crc"])
def test_every_net(files, net: str) -> None:
    out = files["root"] / f"run-{net}"
    assert main(["elicit", files["model"], files["jsonl"], "--net", net, "--layers", "1", "--max-examples", "40",
                 "--n-bootstrap", "50", "--out", str(out), "--no-progress", "--character", "Alice"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["features"] == ("pair" if net in ("ccs", "crc") else "diff") and config["character"] == "Alice"
    assert len(read_csv(out / "eval.csv")) == 1


def test_sweep_with_pooled_dataset(files) -> None:
    out = files["root"] / "sweep"
    assert main(["sweep", "--models", files["model"], "--datasets", files["jsonl"], files["csv"], "--add-pooled",
                 "--net", "mean-diff", "--layers", "0", "--max-examples", "30", "--n-bootstrap", "50",
                 "--out", str(out), "--no-progress"]) == 0
    summary = read_csv(out / "summary.csv")
    assert [r["dataset"] for r in summary] == [files["jsonl"], files["csv"], "pooled"]
    pooled = json.loads((out / "tiny-llama" / "pooled" / "config.json").read_text())
    assert pooled["n_train"] == sum(json.loads((out / "tiny-llama" / d / "config.json").read_text())["n_train"]
                                    for d in ("colours", "more"))


def test_errors_are_one_line(files, capsys) -> None:
    assert main(["elicit", files["model"], str(files["root"] / "missing.jsonl"), "--no-progress"]) == 1
    assert "no such dataset file" in capsys.readouterr().err
    assert main(["eval", str(files["root"] / "nope"), files["model"], files["jsonl"]]) == 1
    capsys.readouterr()
    # A model directory that does not exist: transformers raises OSError; still one line, exit 1.
    assert main(["iti", "fit", str(files["root"] / "no-model"), files["jsonl"], "--out",
                 str(files["root"] / "iti-out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("intervene iti fit: error: no such model directory") and len(err.strip().splitlines()) == 1
    # With progress lines ([1/3] ...) on stderr, the error is still the one last line.
    assert main(["iti", "fit", str(files["root"] / "no-model"), files["jsonl"], "--out",
                 str(files["root"] / "iti-out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("intervene iti fit: error: ")


def test_python_api_with_a_loaded_model(files) -> None:
    model, tok = tiny_model("llama"), word_tokenizer("left")
    cfg = ElicitConfig(model="tiny", dataset=files["jsonl"], net="lr", layers=[0], max_train=20, max_test=20,
                       n_bootstrap=20, progress=False)
    res = elicit(cfg, model=model, tok=tok)
    assert res.run_dir is None and list(res.probes) == [0] and res.best["layer"] == 0
    assert res.probes[0].coef_.shape == (32,)


def test_demo_model_elicits_alice_truth(tmp_path) -> None:
    from intervene.assets import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("the demo model has not been trained yet")
    out = tmp_path / "demo"
    assert main(["elicit", "demo", "quirky:addition", "--net", "lr", "--character", "Alice",
                 "--max-examples", "300", "200", "--n-bootstrap", "100", "--out", str(out), "--no-progress",
                 "--batch-size", "64"]) == 0
    rows = read_csv(out / "eval.csv")
    # Contrast-pair features sit on the appended answer token, where this model only partly encodes
    # whether the answer is right (measured 0.80 at layer 3; chance is 0.5; the prompt's last token,
    # which the demo probes, reaches 0.99).
    assert max(r["auroc"] for r in rows) > 0.7
    torch.manual_seed(0)  # keep global RNG use deterministic for later tests
