"""LoReFT and DiReFT: the edit against its formula with plain hooks, the identity start, R's rows orthonormal after
every training step, the exact bake at positions "all" (and the refusals), Bob made truthful on the demo model,
save/load, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import intervene as iv
from intervene.errors import NotBakeableError
from intervene.sites import resolve_site
from intervene.training import TrainConfig, Trainer, last_token_cross_entropy, random_orthonormal
from tests.test_das import hooked, padded
from tests.test_training import collate, examples
from tests.tiny_models import HIDDEN, tiny_model


def random_loreft(model, site: str, rank: int = 3, positions="last", seed: int = 0) -> iv.LoReFT:
    g = torch.Generator().manual_seed(seed)
    w = iv.LoReFT.create(model, site, rank).width
    return iv.LoReFT(site, w, rank, positions=positions, rotation=random_orthonormal(w, rank, g),
                     weight=torch.randn(rank, w, generator=g) * 0.5, bias=torch.randn(rank, generator=g))


def random_direft(model, site: str, rank: int = 3, positions="last", seed: int = 0) -> iv.DiReFT:
    g = torch.Generator().manual_seed(seed)
    w = iv.DiReFT.create(model, site, rank).width
    return iv.DiReFT(site, w, rank, positions=positions, down_weight=torch.randn(rank, w, generator=g) * 0.5,
                     down_bias=torch.randn(rank, generator=g), up_weight=torch.randn(w, rank, generator=g) * 0.5)


def formula(x: iv.Intervention) -> callable:
    """Φ on float64 column vectors, from the saved tensors and the paper's formula."""
    t = {k: v.double() for k, v in x.tensors().items()}
    if isinstance(x, iv.LoReFT):
        r, w, b = t["rotation"].T, t["weight"], t["bias"]  # R [r, n] with orthonormal rows
        return lambda h: h + r.T @ (w @ h + b - r @ h)
    w1, b, w2 = t["down.weight"], t["down.bias"], t["up.weight"].T  # W2 [r, n]
    return lambda h: h + w2.T @ (w1 @ h + b)


@pytest.mark.parametrize("family,site,kind,positions", [
    ("llama", "layers.0", "loreft", "last"), ("gpt2", "layers.0", "loreft", "last"),
    ("llama_gqa", "layers.1.heads", "loreft", "all"), ("llama", "layers.0.mlp", "direft", "last"),
    ("gpt2", "layers.1.attn", "direft", "all")])
def test_edit_matches_its_formula(family: str, site: str, kind: str, positions: str) -> None:
    model = tiny_model(family)
    x = (random_loreft if kind == "loreft" else random_direft)(model, site, positions=positions)
    batch = padded([6, 3, 5], seed=7)
    with torch.no_grad(), iv.Intervenable(model, [x]) as ivm:
        got = ivm(**{**batch, "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)}).logits
    phi = formula(x)
    real = batch["attention_mask"].bool()

    def edit(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        flat = h.view(*h.shape[:2], -1)
        for i in range(flat.shape[0]):
            cols = [flat.shape[1] - 1] if positions == "last" else real[i].nonzero().flatten().tolist()
            for c in cols:
                flat[i, c] = phi(flat[i, c].double()).to(h.dtype)
        return h

    want, _ = hooked(model, site, batch, edit)
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-5)
    plain, _ = hooked(model, site, batch)
    assert (got[real] - plain[real]).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [iv.LoReFT, iv.DiReFT])
def test_untrained_is_exactly_the_identity(cls) -> None:
    model = tiny_model("llama")
    batch = padded([5, 4], seed=8)
    x = cls.create(model, "layers.0", 4, positions="all")
    with torch.no_grad(), iv.Intervenable(model, [x]) as ivm:
        got = ivm(**batch).logits
        with ivm.disabled():
            base = ivm(**batch).logits
    assert torch.equal(got, base)


def test_rows_of_r_stay_orthonormal_after_every_step() -> None:
    model = tiny_model("llama")
    x = iv.LoReFT.create(model, "layers.1", 4)
    errors: list[float] = []

    def check(step: int, total: int) -> None:
        r = x.projection().detach()
        errors.append(float((r @ r.T - torch.eye(4)).abs().max()))

    trainer = Trainer(model, [x], last_token_cross_entropy, TrainConfig(lr=0.1, epochs=3, batch_size=4, patience=None),
                      collate=collate, progress=False, callbacks=[check])
    result = trainer.fit(examples(24, seed=3))
    assert len(errors) == result.steps >= 12 and max(errors) < 1e-5
    r = x.projection()  # eval mode: the cached matrix that is saved
    assert float((r @ r.T - torch.eye(4)).abs().max()) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bake_at_positions_all_is_exact(family: str) -> None:
    """LoReFT at the heads (o_proj input: W·Aᵀ, b + W·c) and DiReFT at the MLP's output (Aᵀ·W, Aᵀ·b + c), baked
    together, equal the hooked model; the original model is untouched."""
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edits = [random_loreft(model, "layers.0.heads", positions="all", seed=1),
             random_direft(model, "layers.1.mlp", positions="all", seed=2)]
    edits[1].name = "direft"
    batch = padded([6, 4], seed=9)
    ivm = iv.Intervenable(model, edits, attach=False)
    baked = ivm.bake()
    with torch.no_grad():
        want = ivm(**batch).logits
        got = baked(**batch).logits
    real = batch["attention_mask"].bool()
    assert (want[real] - model(**batch).logits[real]).abs().max() > 1e-2
    assert float((got[real] - want[real]).abs().max()) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bake_refusals_say_why() -> None:
    model = tiny_model("llama")
    with pytest.raises(NotBakeableError, match="residual stream .* skip connections"):
        iv.Intervenable(model, [random_loreft(model, "layers.0", positions="all")], attach=False).bake()
    with pytest.raises(NotBakeableError, match="only positions='all' bakes"):
        iv.Intervenable(model, [random_loreft(model, "layers.0.heads", positions="last")], attach=False).bake()


@pytest.fixture(scope="module")
def demo():
    from intervene.assets import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("the demo model has not been built")
    return iv.demo_model()


def test_demo_model_bob_answers_truthfully(demo, tmp_path) -> None:
    """Trained on held-in questions asked of both characters with the truth as target, a rank-4 LoReFT at the
    last token's residual after block 0 makes Bob truthful on held-out questions; Alice stays truthful.
    Measured (examples/reft_quirky.py, 400 questions): Bob 0.207 -> 1.000 on addition."""
    from intervene.data.quirky import quirky_dataset
    from intervene.evaluate.choices import choice_logits

    model, tok = demo
    rows = [{"text": r["text"], "target": r["choices"][r["label"]]}
            for r in quirky_dataset("addition", split="train", n=100, seed=0)]
    x = iv.LoReFT.fit(model, tok, rows, "layers.0", rank=4, epochs=2, progress=False)
    test = quirky_dataset("addition", split="test", n=60, seed=1)

    def accuracy(who: str, edit: iv.Intervention | None) -> float:
        sub = [r for r in test if r["character"] == who]
        with iv.Intervenable(model, [edit] if edit else []):
            pred = choice_logits(model, tok, sub).argmax(-1)
        return float((pred == torch.tensor([r["label"] for r in sub])).float().mean())

    assert accuracy("Bob", None) < 0.4
    assert accuracy("Bob", x) >= 0.9 and accuracy("Alice", x) >= 0.95
    ivm = iv.Intervenable(model, [x], attach=False)
    ivm.save_pretrained(tmp_path / "reft")
    loaded = iv.Intervenable.load(tmp_path / "reft", model, attach=False)
    (y,) = loaded.interventions
    assert isinstance(y, iv.LoReFT) and y.config["rank"] == 4 and y.config["n_rows"] == 200
    batch = tok([r["text"] for r in test[:8]], return_tensors="pt", padding=True)
    with torch.no_grad():
        outs = []
        for edit in (x, y):
            with iv.Intervenable(model, [edit]) as e:
                outs.append(e(**batch).logits)
    assert torch.equal(outs[0], outs[1])


def test_cli_fit_and_eval(demo, tmp_path) -> None:
    from intervene.cli import main

    out = tmp_path / "reft"
    assert main(["reft", "fit", "demo", "quirky:addition", "--site", "layers.0", "--rank", "2", "--epochs", "1",
                 "--n-train", "30", "--n-eval", "10", "--n-ref", "4", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"Bob", "Alice", "side_effects_all_positions", "side_effects_own_positions"} <= set(metrics["held_out"])
    assert main(["reft", "eval", "demo", str(out), "quirky:addition", "--n-eval", "10", "--n-ref", "4",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["Bob"]["n"] == 10
    assert main(["reft", "fit", "demo", "quirky:addition", "--site", "layers.0", "--variant", "direft",
                 "--epochs", "1", "--n-train", "10", "--n-eval", "4", "--n-ref", "2", "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "d" / "intervene_config.json").read_text())
    assert cfg["interventions"][0]["type"] == "direft"


def test_widths_and_sites_are_checked() -> None:
    model = tiny_model("llama")
    with pytest.raises(iv.InterventionError, match="one site"):
        iv.LoReFT("layers.*", HIDDEN, 2)
    with pytest.raises(iv.InterventionError, match="rank"):
        iv.LoReFT("layers.0", HIDDEN, HIDDEN + 1)
    with pytest.raises(iv.InterventionError, match="wide"):
        iv.Intervenable(model, [iv.LoReFT("layers.0", HIDDEN + 1, 2)])
    assert resolve_site(model, "layers.0.heads").shape == (4, 8)
    x = iv.LoReFT.create(model, "layers.0.heads", 2)
    assert x.width == HIDDEN  # the heads site is flattened to n_heads·head_dim
