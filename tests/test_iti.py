"""ITI: batched probes vs scikit-learn, head selection, directions/σ, the exact edit, save/load, bake."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from intervene import Intervenable
from intervene.errors import InterventionError, NotBakeableError
from intervene.methods.iti.fit import build_examples, head_directions, rank_heads, split_by_group
from intervene.methods.iti.intervention import ITI
from intervene.probes.solvers import fit_head_probes
from tests.tiny_models import tiny_model

# The o_proj (attention output projection) of each family, by hand: the reference hooks sit here.
O_PROJ = {
    "llama": "model.layers.{i}.self_attn.o_proj",
    "llama_gqa": "model.layers.{i}.self_attn.o_proj",
    "gpt2": "transformer.h.{i}.attn.c_proj",
    "gpt_neox": "gpt_neox.layers.{i}.attention.dense",
}
HEADS = [(1, 3), (0, 1), (1, 0)]  # (layer, head); tiny models have 2 layers x 4 heads of dim 8


@functools.cache
def char_tokenizer():
    """A character-level fast tokenizer for the 96-token tiny models (id 0 = pad)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 126)]
    tk = Tokenizer(models.WordLevel({"<pad>": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<pad>")
    tok.padding_side = "left"
    return tok


def _iti(alpha: float = 3.0, positions: str = "all", seed: int = 0) -> ITI:
    g = torch.Generator().manual_seed(seed)
    return ITI(HEADS, torch.randn(3, 8, generator=g), torch.rand(3, generator=g) + 0.5, alpha=alpha,
               positions=positions)


def _reference_hooks(model, family: str, iti: ITI, mask_fn=None):
    """Hand-written: add alpha*sigma*unit(direction) to columns [h*Dh, (h+1)*Dh) of o_proj's input.

    ``mask_fn(x)`` returns None (every position), False (none) or a [batch, seq] bool mask.
    """
    handles = []
    dh = iti.directions_.shape[1]
    for layer in sorted({lay for lay, _ in iti.heads}):
        mod = model.get_submodule(O_PROJ[family].format(i=layer))
        chosen = [(h, iti.alpha * iti.sigma_[k] * iti.directions_[k])
                  for k, (lay, h) in enumerate(iti.heads) if lay == layer]

        def pre(_m, args, chosen=chosen):
            x = args[0].clone()
            m = None if mask_fn is None else mask_fn(x)
            for h, shift in chosen:
                sl = x[..., h * dh:(h + 1) * dh]
                if m is None:
                    sl += shift.to(x.dtype)
                elif m is not False:
                    sl[m] += shift.to(x.dtype)
            return (x, *args[1:])

        handles.append(mod.register_forward_pre_hook(pre))
    return handles


# ---- probes: same answers as honest_llama's per-head scikit-learn loop ---------------------------
def _synthetic_heads(n_layers=3, n_heads=8, n_questions=120, d=16, seed=0):
    """[N, L, H, D] activations of 2 answers per question; head strength varies across heads."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * n_questions
    y = torch.tensor([1, 0] * n_questions)
    strength = torch.linspace(0.0, 1.2, n_layers * n_heads)[torch.randperm(n_layers * n_heads, generator=g)]
    u = torch.nn.functional.normalize(torch.randn(n_layers * n_heads, d, generator=g), dim=-1)
    mix = torch.randn(n_layers * n_heads, d, d, generator=g) / d ** 0.5 + torch.eye(d)
    x = torch.randn(n_layers * n_heads, n, d, generator=g) @ mix
    x = x + (2 * y - 1)[None, :, None] * strength[:, None, None] * u[:, None, :] + torch.randn(
        n_layers * n_heads, 1, d, generator=g)
    rows = [{"text": f"q{i // 2} a{i % 2}", "label": int(y[i]), "question_id": f"q{i // 2}"} for i in range(n)]
    return x.reshape(n_layers, n_heads, n, d).permute(2, 0, 1, 3).contiguous(), y, rows


def test_probes_match_sklearn_per_head():
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    acts, y, rows = _synthetic_heads()
    iti = ITI.fit(None, None, rows, num_heads=10, activations=acts, seed=0)
    train, val = split_by_group([r["question_id"] for r in rows], 0.2, 0)
    x = acts.numpy()
    ours = iti.head_accuracies_.numpy()
    ref = np.zeros_like(ours)
    with threadpool_limits(1):  # multi-threaded BLAS on tiny problems is slow on shared cores
        for layer in range(x.shape[1]):
            for head in range(x.shape[2]):
                clf = LogisticRegression(random_state=0, max_iter=1000).fit(x[train][:, layer, head], y[train].numpy())
                ref[layer, head] = (clf.predict(x[val][:, layer, head]) == y[val].numpy()).mean()
    assert np.abs(ours - ref).max() <= 0.01 + 1e-9
    ref_top = set(rank_heads(torch.tensor(ref), 10))
    assert len(ref_top & set(iti.heads)) >= 9


def test_solver_reaches_the_sklearn_optimum():
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    acts, y, _ = _synthetic_heads(n_layers=1, n_heads=6)
    x = acts[:, 0].permute(1, 0, 2)  # [H, N, D]
    fit = fit_head_probes(x, y, C=0.5, tol=1e-7)
    assert bool(fit.converged.all())
    for h in range(x.shape[0]):
        with threadpool_limits(1):
            clf = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(x[h].double().numpy(), y.numpy())
        torch.testing.assert_close(fit.coef[h].double(), torch.tensor(clf.coef_[0]), atol=2e-4, rtol=2e-3)
        assert abs(float(fit.intercept[h]) - clf.intercept_[0]) < 2e-4


def test_split_keeps_questions_whole_and_is_deterministic():
    groups = [f"q{i // 3}" for i in range(60)]
    train, val = split_by_group(groups, 0.25, seed=1)
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val})
    assert len({groups[i] for i in val}) == 5 and len(train) + len(val) == 60
    t2, v2 = split_by_group(groups, 0.25, seed=1)
    assert torch.equal(train, t2) and torch.equal(val, v2)


def test_directions_and_sigma_by_hand():
    acts, y, _ = _synthetic_heads(n_layers=2, n_heads=3)
    x = acts.permute(1, 2, 0, 3)  # [L, H, N, D]
    heads = [(1, 2), (0, 0)]
    unit, sigma = head_directions(x, y, heads, "mass_mean")
    for k, (lay, h) in enumerate(heads):
        xs = x[lay, h].double().numpy()
        d = xs[y.numpy() == 1].mean(0) - xs[y.numpy() == 0].mean(0)
        d /= np.linalg.norm(d)
        np.testing.assert_allclose(unit[k].numpy(), d, atol=1e-6)
        np.testing.assert_allclose(float(sigma[k]), np.std(xs @ d), rtol=1e-5)  # np.std: ddof=0
    coef = torch.randn(2, 3, 16)
    unit_p, _ = head_directions(x, y, heads, "probe", probe_coef=coef)
    torch.testing.assert_close(unit_p[0], coef[1, 2] / coef[1, 2].norm())
    r1, _ = head_directions(x, y, heads, "random", seed=3)
    r2, _ = head_directions(x, y, heads, "random", seed=3)
    assert torch.equal(r1, r2) and torch.allclose(r1.norm(dim=-1), torch.ones(2))


def test_build_examples_formats():
    tqa = {"question": "Is the sky blue?", "mc1_targets": {"choices": ["Yes", "No"], "labels": [1, 0]},
           "mc2_targets": {"choices": ["Yes", "It is", "No"], "labels": [1, 1, 0]}}
    quirky = {"text": "Bob: 1 + 1 = 3. True or False?", "choices": [" False", " True"], "label": 0,
              "statement": "1 + 1 = 3", "question_id": "addition:1 + 1 = 3", "character": "Bob"}
    ex = build_examples([tqa, quirky, {"text": "plain", "label": 1}, ("pair", 0)])
    assert ex.texts[:3] == ["Q: Is the sky blue? A: Yes", "Q: Is the sky blue? A: It is", "Q: Is the sky blue? A: No"]
    assert ex.texts[3:5] == [quirky["text"] + " False", quirky["text"] + " True"]
    assert ex.labels.tolist() == [1, 1, 0, 1, 0, 1, 0]
    assert ex.groups[:3] == ["Is the sky blue?"] * 3 and ex.groups[3] == ex.groups[4] == "addition:1 + 1 = 3"
    with pytest.raises(ValueError):
        build_examples([{"foo": 1}])


# ---- the edit ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "llama_gqa", "gpt2", "gpt_neox"])
def test_apply_equals_reference_hook(family):
    model = tiny_model(family)
    iti = _iti()
    x = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), Intervenable(model, [iti]) as ivm:
        ours = ivm(input_ids=x).logits
    handles = _reference_hooks(model, family, iti)
    try:
        with torch.no_grad():
            ref = model(input_ids=x).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(ours, ref)
    assert not torch.allclose(ours, model(input_ids=x).logits)


def test_alpha_zero_is_bit_identical_and_alpha_rescales():
    model = tiny_model("llama_gqa")
    x = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    iti = _iti(alpha=0.0)
    with torch.no_grad():
        base = model(input_ids=x).logits
        with Intervenable(model, [iti]) as ivm:
            assert torch.equal(ivm(input_ids=x).logits, base)
            iti.alpha = 4.0
            torch.testing.assert_close(iti.shifts, 4.0 * iti.sigma_[:, None] * iti.directions_)
            assert not torch.equal(ivm(input_ids=x).logits, base)


def test_positions_last_and_generated():
    model = tiny_model("llama_gqa")
    x = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    last = _iti(positions="last")
    with torch.no_grad(), Intervenable(model, [last]) as ivm:
        ours = ivm(input_ids=x).logits

    def at_last(h):
        m = torch.zeros(h.shape[:2], dtype=torch.bool)
        m[:, -1] = True
        return m

    handles = _reference_hooks(model, "llama_gqa", last, at_last)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    for h in handles:
        h.remove()
    assert torch.equal(ours, ref)

    gen = _iti(alpha=20.0, positions="generated")
    kw = dict(max_new_tokens=5, do_sample=False, use_cache=True)
    with torch.no_grad(), Intervenable(model, [gen]) as ivm:
        ours = ivm.generate(input_ids=x, **kw)
    # with the KV cache, the prompt runs in one call and every generated token alone
    handles = _reference_hooks(model, "llama_gqa", gen, lambda h: None if h.shape[1] == 1 else False)
    with torch.no_grad():
        ref = model.generate(input_ids=x, **kw)
    for h in handles:
        h.remove()
    assert torch.equal(ours, ref)


def test_bind_rejects_wrong_shapes():
    model = tiny_model("llama")
    bad = ITI([(0, 1)], torch.randn(1, 5), torch.ones(1))
    with pytest.raises(InterventionError):
        Intervenable(model, [bad])
    with pytest.raises(InterventionError):
        Intervenable(model, [ITI([(0, 7)], torch.randn(1, 8), torch.ones(1))])


def test_save_load_round_trip_identical_logits(tmp_path):
    model = tiny_model("llama_gqa")
    iti = _iti(alpha=7.5)
    x = torch.randint(1, 90, (2, 8), generator=torch.Generator().manual_seed(4))
    ivm = Intervenable(model, [iti])
    with torch.no_grad():
        before = ivm(input_ids=x).logits
    ivm.save_pretrained(tmp_path)
    ivm.detach()
    cfg = json.loads((tmp_path / "intervene_config.json").read_text())["interventions"][0]
    assert cfg["type"] == "iti" and cfg["params"]["heads"] == [list(h) for h in HEADS]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "intervene_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"iti.direction": (3, 8), "iti.sigma": (3,)}
    loaded = Intervenable.load(tmp_path, model)
    try:
        with torch.no_grad():
            after = loaded(input_ids=x).logits
    finally:
        loaded.detach()
    assert torch.equal(before, after)
    assert loaded["iti"].heads == HEADS and loaded["iti"].alpha == 7.5


# ---- baking ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "llama_gqa", "gpt2"])
def test_bake_matches_hooks_after_vanilla_reload(family, tmp_path):
    model = tiny_model(family)
    iti = _iti(alpha=6.0)
    x = torch.randint(1, 90, (3, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), Intervenable(model, [iti]) as ivm:
        hooked = ivm(input_ids=x).logits
        baked = ivm.bake()
    # the bias change is exactly W_o · d with d the layer's concatenated head shifts
    for layer in (0, 1):
        path = O_PROJ[family].format(i=layer)
        w = model.get_submodule(path).weight.double()
        w = w.t() if family == "gpt2" else w  # Conv1D stores [in, out]
        d = iti.layer_shift(f"layers.{layer}.heads", 4).reshape(-1).double()
        b0 = model.get_submodule(path).bias
        delta = baked.get_submodule(path).bias.double() - (0 if b0 is None else b0.double())
        torch.testing.assert_close(delta, w @ d, atol=1e-6, rtol=1e-6)
    baked.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = reloaded(input_ids=x).logits
    assert (out - hooked).abs().max() < 1e-4
    if family.startswith("llama"):
        assert reloaded.config.attention_bias is True


def test_bake_refuses_partial_positions():
    with Intervenable(tiny_model("llama"), [_iti(positions="generated")]) as ivm, pytest.raises(NotBakeableError):
        ivm.bake()


# ---- fitting on a model ------------------------------------------------------------------------
def test_fit_on_a_tiny_model_end_to_end():
    model, tok = tiny_model("llama_gqa"), char_tokenizer()
    rows = [{"question": f"What is {a} plus {b}?",
             "mc2_targets": {"choices": [str(a + b), str(a + b + 1), str(a * b + 2)], "labels": [1, 0, 0]}}
            for a in range(8) for b in range(3)]
    iti = ITI.fit(model, tok, rows, num_heads=5, alpha=2.0, direction="probe", batch_size=32)
    assert len(iti.heads) == 5 and iti.head_accuracies_.shape == (2, 4)
    assert iti.directions_.shape == (5, 8) and torch.allclose(iti.directions_.norm(dim=-1), torch.ones(5))
    assert iti.sites == sorted({f"layers.{lay}.heads" for lay, _ in iti.heads})
    accs = [float(iti.head_accuracies_[lay, h]) for lay, h in iti.heads]
    assert accs == sorted(accs, reverse=True)
    assert iti.fit_info_["n_examples"] == 72 and iti.fit_info_["sigma_ddof"] == 0
    # the same activations passed in give the same fit
    from intervene.methods.iti.fit import head_activations

    texts = build_examples(rows).texts
    acts = head_activations(model, tok, texts, batch_size=32).permute(2, 0, 1, 3)
    again = ITI.fit(None, None, rows, num_heads=5, alpha=2.0, direction="probe", activations=acts)
    assert again.heads == iti.heads and torch.equal(again.directions_, iti.directions_)


# ---- sweep and command line ----------------------------------------------------------------------
def _tqa_rows(n: int, split: str | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7, i // 7
        row = {"question": f"What is {a} plus {b}?",
               "mc1_targets": {"choices": [str(a + b), str(a + b + 1)], "labels": [1, 0]},
               "mc2_targets": {"choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "labels": [1, 0, 0]}}
        if split:
            row["split"] = split
        rows.append(row)
    return rows


def test_sweep_rows_csv_and_plots(tmp_path):
    from intervene.methods.iti.evaluate import sweep, write_csv
    from intervene.methods.iti.plots import plot_head_accuracies, plot_tradeoff

    model, tok = tiny_model("llama_gqa"), char_tokenizer()
    iti = ITI.fit(model, tok, _tqa_rows(20), num_heads=4, alpha=1.0)
    rows = sweep(model, tok, iti, _tqa_rows(4), ["a short text", "another one here"], alphas=[0.0, 5.0],
                 num_heads=[2, 4])
    assert [(r["num_heads"], r["alpha"]) for r in rows] == [(0, 0.0), (2, 0.0), (2, 5.0), (4, 0.0), (4, 5.0)]
    assert rows[1]["mc2"] == rows[0]["mc2"] and rows[0]["kl"] == 0.0 and rows[4]["kl"] > 0.0
    text = write_csv(rows, tmp_path / "s.csv").read_text().splitlines()
    assert text[0].startswith("num_heads,alpha,mc1,mc2,ce_base,ce,ce_delta,kl") and len(text) == 6
    for png in (plot_tradeoff(rows, tmp_path / "t.png", "mc2"),
                plot_head_accuracies(iti.head_accuracies_, tmp_path / "h.png", iti.heads)):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_fit_eval_sweep(tmp_path, capsys):
    from intervene.cli import main

    model_dir = tmp_path / "model"
    tiny_model("llama_gqa").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "tqa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _tqa_rows(24, "train") + _tqa_rows(6, "test")) + "\n")
    refs = tmp_path / "ref.txt"
    refs.write_text("one line of text\nanother line\n")
    out = tmp_path / "iti"
    assert main(["iti", "fit", str(model_dir), str(data), "--num-heads", "3", "--alpha", "2", "--out", str(out)]) == 0
    assert {"intervene_config.json", "intervene_weights.safetensors", "head_accuracies.png",
            "metrics.json", "report.html"} <= {p.name for p in out.iterdir()}
    assert "The 3 heads ITI shifts" in (out / "report.html").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["top_heads"]) == 3 and len(metrics["head_accuracies"]) == 2
    capsys.readouterr()
    assert main(["iti", "eval", str(model_dir), str(out), str(data), "--ref-texts", str(refs)]) == 0
    summary = capsys.readouterr().out  # one human line; the numbers go to a file beside the diff
    assert "mc2" in summary and str(out / "eval_tqa.json") in summary
    res = json.loads((out / "eval_tqa.json").read_text())
    assert set(res["iti"]) >= {"mc1", "mc2", "ce", "kl"} and res["base"]["kl"] == 0.0 and res["num_heads"] == 3
    sw = tmp_path / "sweep"
    assert main(["iti", "sweep", str(model_dir), str(data), "--num-heads", "1", "2", "--alphas", "0", "3",
                 "--ref-texts", str(refs), "--out", str(sw)]) == 0
    assert (sw / "sweep.csv").read_text().count("\n") == 6 and (sw / "tradeoff.png").is_file()
    assert main(["iti", "eval", str(model_dir), str(tmp_path / "missing"), str(data)]) == 1


# ---- the shipped quirky demo model ---------------------------------------------------------------
# Measured on the shipped model, ITI fitted on Alice's training rows (100 questions per task, each with both
# answers, labelled by the answer's truth), K=8, alpha=1.5, edit at every position: Bob against the truth
# addition 0.22 -> 0.63, comparison 0.43 -> 0.56, facts 0.62 -> 0.75; Alice stays at 1.00; CE +0.33 nats
# on neutral text (the ITI paper reports +0.32 on LLaMA-7B). Best head probe 0.94 (layer 2). The bounds
# leave a margin.
ALICE_GAIN_ADDITION, ALICE_MEAN_GAIN, ALICE_MAX_CE_DELTA = 0.25, 0.15, 0.5
# Speaker contrast (comparison, K=8, alpha=1): Bob 0.43 -> 0.8+, CE +1.95; a regression guard, not a claim.
SPEAKER_GAIN, SPEAKER_MAX_CE_DELTA = 0.3, 2.5


def _demo_check(model, tok, iti, task: str = "comparison", ce: bool = True) -> dict[str, float]:
    """``iti`` applied to held-out Bob and Alice prompts of ``task`` (accuracy against the truth), and
    (if ``ce``) CE/KL on the model's neutral held-out text with the shift where ``iti.positions`` says."""
    from intervene.assets import DEMO_MODEL_DIR
    from intervene.data.quirky import quirky_dataset
    from intervene.evaluate.choices import choice_logits
    from intervene.evaluate.side_effects import load_reference_texts, side_effects

    test = quirky_dataset(task, "test", n=100, seed=1)

    def acc(who: str, edit=None) -> float:
        rows = [r for r in test if r["character"] == who]
        truth = torch.tensor([r["label"] for r in rows])
        with Intervenable(model, [] if edit is None else [edit]):
            return float((choice_logits(model, tok, rows).argmax(-1) == truth).double().mean())

    res = {"bob_before": acc("Bob"), "bob_after": acc("Bob", iti), "alice_before": acc("Alice"),
           "alice_after": acc("Alice", iti)}
    if iti.head_accuracies_ is not None:
        res["max_head_acc"] = float(iti.head_accuracies_.max())
    if ce:  # the same neutral text for every task: measured once per intervention
        refs = load_reference_texts(DEMO_MODEL_DIR / "neutral_eval.txt", 60)
        res["ce_delta"] = side_effects(model, tok, refs, iti, batch_size=60)["ce_delta"]
    return res


@pytest.fixture(scope="module")
def demo():
    from intervene.assets import DEMO_MODEL_DIR, demo_model

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("the demo model is not built")
    return demo_model()


def test_quirky_demo_model_iti_fitted_on_alice_makes_bob_truthful(demo):
    """The issue's scientific check. ITI fitted on Alice's prompts alone, each followed by a true and a
    false answer (TruthfulQA's format), raises Bob's accuracy against the truth on held-out questions of
    every task, leaves Alice's answers alone and costs a few tenths of a nat of CE on neutral text.

    Why it can: the model reads, from the answers so far, whether a speaker judges truthfully (quirky
    transcripts), so it computes at each answer token whether that answer is true. The mass-mean
    direction of those heads is "the answers here are true"; shifted along it, Bob judges as a truthful
    speaker would."""
    from intervene.data.quirky import QUIRKY_TASKS, quirky_dataset

    model, tok = demo
    rows = [r for t in QUIRKY_TASKS for r in quirky_dataset(t, "train", n=100, characters=("Alice",), seed=0)]
    iti = ITI.fit(model, tok, rows, num_heads=8, alpha=1.5, batch_size=64)
    assert float(iti.head_accuracies_.max()) >= 0.85
    res = {t: _demo_check(model, tok, iti, t, ce=t == "addition") for t in QUIRKY_TASKS}
    print("ITI fitted on Alice:", res)
    gains = [r["bob_after"] - r["bob_before"] for r in res.values()]
    assert min(gains) > 0.05 and sum(gains) / len(gains) >= ALICE_MEAN_GAIN
    assert gains[QUIRKY_TASKS.index("addition")] >= ALICE_GAIN_ADDITION
    assert all(r["alice_after"] >= 0.95 for r in res.values())
    assert res["addition"]["ce_delta"] < ALICE_MAX_CE_DELTA
    # The control: a random direction with the same heads and scale changes nothing.
    rand = ITI.fit(model, tok, rows, num_heads=8, alpha=1.5, batch_size=64, direction="random", seed=0)
    assert abs(_demo_check(model, tok, rand, "addition", ce=False)["bob_after"] - res["addition"]["bob_before"]) < 0.1


def test_quirky_demo_model_iti_speaker_contrast_makes_bob_truthful(demo):
    """ITI fitted on the truthful-vs-untruthful speaker contrast (the same training questions asked of
    Alice and of Bob) also turns Bob, at a larger CE cost with the edit at every position."""
    from intervene.data.quirky import quirky_dataset, speaker_contrast

    model, tok = demo
    rows = speaker_contrast(quirky_dataset("comparison", "train", n=300, seed=0))
    iti = ITI.fit(model, tok, rows, num_heads=8, alpha=1.0, batch_size=64)
    res = _demo_check(model, tok, iti)
    print("ITI on the speaker contrast:", res)
    assert res["max_head_acc"] >= 0.95  # heads that carry the speaker to the answer position
    assert res["bob_after"] >= res["bob_before"] + SPEAKER_GAIN and res["alice_after"] >= 0.85
    assert res["ce_delta"] < SPEAKER_MAX_CE_DELTA
    # The same heads and alpha with the edit only at the answer position: Bob still turns and Alice's
    # answers do not move.
    last = _demo_check(model, tok, ITI(iti.heads, iti.directions_, iti.sigma_, alpha=1.0, positions="last"),
                       ce=False)
    assert last["bob_after"] >= last["bob_before"] + SPEAKER_GAIN and last["alice_after"] >= 0.98


def test_cli_fits_on_the_speaker_contrast(demo, tmp_path):
    from intervene.cli import main

    out = tmp_path / "iti"
    assert main(["iti", "fit", "demo", "quirky:comparison", "--labels", "speaker", "--num-heads", "8", "--alpha", "1",
                 "--n", "400", "--batch-size", "64", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["top_heads"]) == 8 and max(map(max, report["head_accuracies"])) >= 0.95
    loaded = Intervenable.load(out, demo[0], attach=False)
    assert loaded.metadata["dataset"] == "quirky:comparison" and loaded.interventions[0].alpha == 1.0
    # Speaker labels need quirky rows: a plain text/label file is refused with a one-line error.
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(json.dumps({"text": f"t {i}", "label": i % 2}) for i in range(8)) + "\n")
    assert main(["iti", "fit", "demo", str(plain), "--labels", "speaker", "--out", str(tmp_path / "x")]) == 1
