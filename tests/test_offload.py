"""Big-model paths on a model dispatched by accelerate across "cpu" and "disk" (weights on the meta device,
loaded per forward by accelerate's hooks): every workflow gives what the undispatched model gives."""

from __future__ import annotations

import copy

import pytest
import torch

import intervene as iv
from intervene.data.quirky import quirky_dataset, remedi_samples, speaker_pairs
from intervene.methods.patching import attribution_patching, logit_diff, sweep, trace

accelerate = pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model, tok = iv.demo_model()
    offloaded = copy.deepcopy(model)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    offloaded = accelerate.dispatch_model(offloaded, device_map=device_map, main_device="cpu",
                                          offload_dir=str(tmp_path_factory.mktemp("offload")))
    assert offloaded.model.layers[3].mlp.down_proj.weight.device.type == "meta"  # really on disk
    return model, offloaded, tok


def test_steered_generate_matches(models) -> None:
    model, off, tok = models
    batch = tok(["Claim: 17 + 5 = 22. Bob marks it", "Bob: 3 + 4 = 8. True or False?"], return_tensors="pt",
                padding=True)
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (model, off):
        steer = iv.Steering({"layers.2": v, "layers.3.heads": torch.randn(4, 32, generator=torch.Generator().manual_seed(1))},
                            scale=2.0, positions="generated")
        with iv.Intervenable(m, [steer]) as ivm:
            outs.append(ivm.generate(**batch, max_new_tokens=6, do_sample=False))
    assert torch.equal(outs[0], outs[1])


def test_collect_and_iti_fit_match(models) -> None:
    model, off, tok = models
    rows = quirky_dataset("addition", split="train", n=40, seed=0, characters=("Alice",))
    a, b = (iv.collect(m, tok, rows, sites=["layers.1", "layers.3.heads"], progress=False) for m in (model, off))
    for s in a.sites:
        torch.testing.assert_close(a[s], b[s], atol=1e-5, rtol=1e-5)
    fits = [iv.ITI.fit(m, tok, rows, num_heads=4, alpha=1.5) for m in (model, off)]
    assert fits[0].heads == fits[1].heads
    torch.testing.assert_close(fits[0].directions_, fits[1].directions_, atol=1e-4, rtol=1e-4)


def test_remedi_fit_matches(models) -> None:
    model, off, tok = models
    samples = remedi_samples("train", n=24, seed=0)
    fits = [iv.Remedi.fit(m, tok, samples, 0, side="input", epochs=2, lr=3e-3, progress=False) for m in (model, off)]
    for x, y in zip(fits[0].history_, fits[1].history_):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
    for p, q in zip(fits[0].editor.parameters(), fits[1].editor.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)
    assert all(p.grad is None for p in off.parameters())


def test_patching_tracing_and_attribution_match(models) -> None:
    model, off, tok = models
    pairs = [p for p in speaker_pairs(quirky_dataset("addition", split="test", n=60, seed=0)) if p["template"] == 4][:4]
    metric = logit_diff([tok(p["answer"], add_special_tokens=False)["input_ids"][0] for p in pairs],
                        [tok(p["wrong"], add_special_tokens=False)["input_ids"][0] for p in pairs])
    clean, corrupted = [p["clean"] for p in pairs], [p["corrupted"] for p in pairs]
    for fn in (sweep, attribution_patching):
        a, b = (fn(m, clean, corrupted, metric, sites=["layers.*", "layers.2.heads"], tokenizer=tok, progress=False)
                for m in (model, off))
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-4)
    s = remedi_samples("test", n=1, seed=0)[0]
    ta, tb = (trace(m, tok, s["prompt"], s["entity"], s["target_true"], window=1, samples=3) for m in (model, off))
    for k in ta.scores:
        torch.testing.assert_close(ta.scores[k], tb.scores[k], atol=1e-5, rtol=1e-4)
