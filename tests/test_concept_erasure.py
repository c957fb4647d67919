"""ConceptErasure against concept-erasure's own LeaceEraser, its diff, its bake, and the quirky speaker.

Exactness is against the peer itself: an eraser fitted by ``LeaceFitter`` directly on the same activations,
applied by ``LeaceEraser.__call__`` (hook output), and a hand-written hook calling it (logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from concept_erasure import LeaceEraser, LeaceFitter
from safetensors.torch import load_file

import intervene as iv
from intervene.data.quirky import quirky_dataset
from intervene.methods.leace.fit import indicators
from tests.tiny_models import tiny_model

SITES = ("layers.1", "layers.1.heads")
CAPTURE = {"layers.1": "layers.2:input", "layers.1.heads": "model.layers.1.self_attn.o_proj:input"}  # after the hook


@pytest.fixture(scope="module")
def demo() -> tuple[T.PreTrainedModel, T.PreTrainedTokenizerBase]:
    return iv.demo_model()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return quirky_dataset("addition", split="train", n=60, seed=1)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _peer_eraser(model, tok, rows, site: str) -> LeaceEraser:
    """The peer fitted by its own code on our collected last-token activations, speaker one-hot."""
    x = _flat(iv.collect(model, tok, rows, site, progress=False)[site])
    z = torch.nn.functional.one_hot(torch.tensor([r["character"] == "Bob" for r in rows]).long()).float()
    return LeaceFitter.fit(x, z).eraser


@pytest.mark.parametrize("site", SITES)
def test_hook_output_is_the_peers_eraser_output(demo, rows, site: str) -> None:
    model, tok = demo
    ours = iv.ConceptErasure.fit(model, tok, rows, site, label_field="character")
    peer = _peer_eraser(model, tok, rows, site)
    for a, b in zip(iv.ConceptErasure.fit(model, tok, rows, site, label_field="character").erasers[site],
                    (peer.proj_left, peer.proj_right, peer.bias)):
        assert torch.equal(a, b)  # our fit is the peer's fit
    texts = [r["text"] for r in rows[:12]]
    x = _flat(iv.collect(model, tok, texts, site, positions="all", progress=False)[site])
    with iv.Intervenable(model, [ours]):
        erased = iv.collect(model, tok, texts, CAPTURE[site], positions="all", progress=False)[CAPTURE[site]]
    want = peer(x)
    assert float((want - x).abs().max()) > 1e-2, "the eraser must change the activations"
    assert torch.equal(_flat(erased), want), float((_flat(erased) - want).abs().max())  # max |Δ| = 0


def _peer_hook(peer: LeaceEraser, site: str, model):
    """A plain PyTorch hook that calls the peer's eraser at ``site`` (no intervene code involved)."""
    layer = model.model.layers[1]
    if site == "layers.1.heads":
        def pre(mod, args):
            return (peer(args[0]),) + tuple(args[1:])
        return layer.self_attn.o_proj.register_forward_pre_hook(pre)

    def post(mod, args, out):
        if isinstance(out, tuple):
            return (peer(out[0]),) + tuple(out[1:])
        return peer(out)
    return layer.register_forward_hook(post)


@pytest.mark.parametrize("site", SITES)
def test_logits_equal_a_hand_written_hook_calling_the_peer(demo, rows, site: str) -> None:
    model, tok = demo
    ours = iv.ConceptErasure.fit(model, tok, rows, site, label_field="character")
    peer = ours.to_leace(site)
    batch = tok([r["text"] for r in rows[:16]], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
        handle = _peer_hook(peer, site, model)
        try:
            want = model(**batch).logits
        finally:
            handle.remove()
        with iv.Intervenable(model, [ours]) as ivm:
            got = ivm(**batch).logits
    real = batch["attention_mask"].bool()
    assert float((want - base)[real].abs().max()) > 1e-2
    # Left padding: our hook skips pad positions (positions="all" counts real tokens), the peer's does not.
    assert torch.equal(got[real], want[real])


def test_save_load_is_bit_identical_and_pickle_free(demo, rows, tmp_path: Path) -> None:
    model, tok = demo
    ours = iv.ConceptErasure.fit(model, tok, rows, ["layers.0", "layers.2.heads"], label_field="character",
                                 positions="last")
    iv.Intervenable(model, [ours], attach=False).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "intervene_config.json",
                                                          "intervene_weights.safetensors"]
    saved = load_file(str(tmp_path / "intervene_weights.safetensors"))
    for k, t in ours.tensors().items():
        assert torch.equal(saved[f"{ours.name}.{k}"], t) and saved[f"{ours.name}.{k}"].dtype == t.dtype
    config = json.loads((tmp_path / "intervene_config.json").read_text())
    (entry,) = config["interventions"]
    assert entry["type"] == "concept_erasure" and entry["params"]["fit"]["classes"] == ["Alice", "Bob"]
    (loaded,) = iv.Intervenable.load(tmp_path, model, attach=False).interventions
    assert isinstance(loaded, iv.ConceptErasure) and loaded.fit_info_ == ours.fit_info_
    batch = tok([r["text"] for r in rows[:8]], return_tensors="pt", padding=True)
    with torch.no_grad():
        with iv.Intervenable(model, [ours]) as ivm:
            a = ivm(**batch).logits
        with iv.Intervenable(model, [loaded]) as ivm:
            b = ivm(**batch).logits
    assert torch.equal(a, b)


def _bake_delta(model, interventions, batch, tmp_path: Path) -> tuple[float, float]:
    """(max |baked - hooked|, max |hooked - base|) on real tokens, the baked model through save_pretrained
    and a vanilla AutoModelForCausalLM.from_pretrained."""
    ivm = iv.Intervenable(model, interventions, attach=False)
    with torch.no_grad():
        base = model(**batch).logits
        hooked = ivm(**batch).logits
        ivm.bake().save_pretrained(tmp_path)
        baked = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(**batch).logits
    real = batch["attention_mask"].bool()
    return float((baked - hooked)[real].abs().max()), float((hooked - base)[real].abs().max())


def test_bake_is_exact_at_heads_sites_on_the_demo_model(demo, rows, tmp_path: Path) -> None:
    model, tok = demo
    eraser = iv.ConceptErasure.fit(model, tok, rows, ["layers.0.heads", "layers.1.heads"], label_field="character")
    batch = tok([r["text"] for r in rows[:16]], return_tensors="pt", padding=True)
    delta, effect = _bake_delta(model, [eraser], batch, tmp_path)
    assert effect > 0.1 and delta < 1e-4, (delta, effect)  # measured: 1.8e-5 against an effect of 14.9


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bake_is_exact_at_writer_inputs_and_outputs(family: str, tmp_path: Path) -> None:
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    down = {"llama": "model.layers.1.mlp.down_proj:input", "gpt2": "transformer.h.1.mlp.c_proj:input"}[family]
    sites = ["layers.0.heads", "layers.1.attn", "layers.0.mlp", down]  # inputs and outputs of linear layers
    erasers = {}
    for s in sites:
        d = int(torch.Size(iv.resolve_site(model, s).shape).numel())
        x = torch.randn(200, d, generator=g)
        y = torch.randint(0, 3, (200,), generator=g)
        x = x + torch.randn(3, d, generator=g)[y] * 2  # three classes with different means
        erasers[s] = LeaceFitter.fit(x, torch.nn.functional.one_hot(y).float()).eraser
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])}
    delta, effect = _bake_delta(model, [iv.ConceptErasure(erasers)], batch, tmp_path)
    assert effect > 1e-2 and delta < 1e-4, (delta, effect)


def test_bake_refuses_residual_points_and_partial_positions_before_any_copy(demo, rows, monkeypatch) -> None:
    import intervene.bake as bake_mod

    model, tok = demo
    monkeypatch.setattr(bake_mod, "clean_copy", lambda m: pytest.fail("copied the model before refusing"))
    resid = iv.ConceptErasure.fit(model, tok, rows, "layers.1", label_field="character")
    with pytest.raises(iv.NotBakeableError, match="skip connections carry it"):
        iv.Intervenable(model, [resid], attach=False).bake()
    last = iv.ConceptErasure.fit(model, tok, rows, "layers.1.heads", label_field="character", positions="last")
    with pytest.raises(iv.NotBakeableError, match="positions='all' bakes"):
        iv.Intervenable(model, [last], attach=False).bake()


def test_fit_options(demo, rows) -> None:
    model, tok = demo
    acts = iv.collect(model, tok, rows, "layers.*", positions="all", progress=False)
    labels = [r["template"] % 3 for r in rows]  # three classes
    e = iv.ConceptErasure.fit(None, None, None, "layers.*", labels=labels, activations=acts)
    assert list(e.erasers) == [f"layers.{i}" for i in range(4)]
    assert e.fit_info_["classes"] == [0, 1, 2] and e.fit_info_["n_rows_fitted"] == int(acts.offsets[-1])
    assert all(r == 2 for r in e.fit_info_["rank"].values())  # k classes: rank k - 1
    z, classes = indicators(torch.tensor([0.5, -1.0, 2.0]))
    assert z.shape == (3, 1) and classes == []
    with pytest.raises(ValueError, match="labels"):
        iv.ConceptErasure.fit(model, tok, [r["text"] for r in rows], "layers.0")
    with pytest.raises(iv.InterventionError, match="acts on"):
        with iv.Intervenable(model, [iv.ConceptErasure(e.eraser("layers.0"), sites="model.layers.0.mlp.down_proj:input")]):
            pass


def test_after_erasure_no_linear_probe_finds_the_speaker(demo, rows) -> None:
    """LEACE's guarantee, checked with our own probes: on the data it was fitted on, the class means of the
    erased activations coincide, so the best linear readout is at chance."""
    model, tok = demo
    site = "layers.1"
    e = iv.ConceptErasure.fit(model, tok, rows, site, label_field="character")
    x = iv.collect(model, tok, rows, site, progress=False)[site]
    erased = e.to_leace(site)(x)
    y = torch.tensor([r["character"] == "Bob" for r in rows])
    gap_before = float((x[y].mean(0) - x[~y].mean(0)).norm())
    gap_after = float((erased[y].mean(0) - erased[~y].mean(0)).norm())
    assert gap_before > 1.0 and gap_after < 1e-4 * gap_before


def test_quirky_speaker_erasure_moves_bob_to_alice_early_not_late(demo) -> None:
    from intervene.methods.leace.evaluate import speaker_erasure_sweep

    model, tok = demo
    res = {r["site"]: r for r in speaker_erasure_sweep(model, tok, ["layers.0", "layers.3"], n_fit=150, n_eval=60,
                                                       n_ref=20)}
    early, late = res["layers.0"], res["layers.3"]
    assert early["bob_as_alice_before"] < 0.05 and early["bob_as_alice_after"] > 0.9
    assert early["bob_matches_model_alice_after"] > 0.9 and early["alice_truthful_after"] > 0.8
    assert late["bob_as_alice_after"] < 0.1  # by the last block the answer no longer reads the speaker linearly
    assert 0 < early["ce_delta"] < 1.0


def test_cli_fit_writes_a_diff_that_loads_and_bakes(tmp_path: Path, demo, capsys) -> None:
    from intervene.cli import main

    out = tmp_path / "erase"
    assert main(["erase", "fit", "demo", "quirky:addition", "--sites", "layers.1.heads", "--label-field",
                 "character", "--n", "40", "--out", str(out)]) == 0
    assert "rank 1" in capsys.readouterr().out
    model, _ = demo
    ivm = iv.Intervenable.load(out, model, attach=False)
    (e,) = ivm.interventions
    assert isinstance(e, iv.ConceptErasure) and e.fit_info_["label_field"] == "character"
    ivm.bake()
