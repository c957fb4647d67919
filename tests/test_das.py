"""DAS and Boundless DAS: the forward against a hand-computed rotation interchange with plain hooks, k = n with the
identity rotation is the full interchange, the mask and its annealing, training (orthogonal after every step,
gradients only into the rotation), the demo model's speaker subspace against a random rotation, save/load, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import intervene as iv
from intervene.errors import InterventionError, NotBakeableError
from intervene.methods.das import DAS, BoundlessDAS, iia, speaker_swap_pairs
from intervene.sites import resolve_site
from intervene.training import random_orthonormal
from tests.tiny_models import HIDDEN, VOCAB, tiny_model


def padded(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Left-padded random rows of the given lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def with_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**batch, "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)}


def hooked(model, site: str, batch: dict[str, torch.Tensor], edit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the site's activation [B, T, width]) with a plain hook on the site's module, ``edit(act)`` applied."""
    s = resolve_site(model, site)
    seen = []

    def grab(h: torch.Tensor) -> torch.Tensor:
        seen.append(h.detach().clone())
        return edit(h) if edit is not None else h

    if s.side == "input":
        handle = s.module.register_forward_pre_hook(lambda m, args: (grab(args[0]), *args[1:]))
    else:
        handle = s.module.register_forward_hook(
            lambda m, a, out: (grab(out[0]), *out[1:]) if isinstance(out, tuple) else grab(out))
    try:
        with torch.no_grad():
            logits = model(**with_positions(batch)).logits
    finally:
        handle.remove()
    return logits, seen[0]


def ours(model, das: DAS, base, source, positions, source_positions) -> torch.Tensor:
    with torch.no_grad(), iv.Intervenable(model, [das]) as ivm, das.interchange(ivm, base, source, positions,
                                                                                  source_positions):
        return ivm(**with_positions(base)).logits


@pytest.mark.parametrize("family,site", [("llama", "layers.0"), ("gpt2", "layers.0"), ("llama_gqa", "layers.1.heads")])
def test_forward_matches_a_hand_computed_rotation_interchange(family: str, site: str) -> None:
    """Rows of different lengths, left padded; base position -1 takes the source's -2 (own-token indices)."""
    model = tiny_model(family)
    base, source = padded([6, 4, 5], seed=1), padded([3, 7, 5], seed=2)
    w = random_orthonormal(HIDDEN, HIDDEN, torch.Generator().manual_seed(3))
    das = DAS(site, HIDDEN, 5, rotation=w)
    got = ours(model, das, base, source, [-1], [-2])
    _, src = hooked(model, site, source)
    cols = [source["attention_mask"].shape[1] - 2] * 3  # left padding: own index -2 is column T-2 in every row
    w64 = w.double()

    def edit(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        flat = h.view(*h.shape[:2], -1)
        for i, c in enumerate(cols):
            b, s = flat[i, -1].double() @ w64, src.view(*src.shape[:2], -1)[i, c].double() @ w64
            mixed = torch.cat([s[:5], b[5:]])
            flat[i, -1] = (mixed @ w64.T).to(h.dtype)
        return h

    want, _ = hooked(model, site, base, edit)
    real = base["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-5)
    plain, _ = hooked(model, site, base)
    assert (got[real] - plain[real]).abs().max() > 1e-3


def test_full_k_with_the_identity_rotation_is_the_full_interchange() -> None:
    model = tiny_model("llama")
    base, source = padded([5, 7], seed=4), padded([6, 3], seed=5)
    das = DAS("layers.0", HIDDEN, HIDDEN, rotation=torch.eye(HIDDEN))
    got = ours(model, das, base, source, [-1], [-1])
    _, src = hooked(model, "layers.0", source)

    def edit(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, -1] = src[:, -1]
        return h

    want, _ = hooked(model, "layers.0", base, edit)
    real = base["attention_mask"].bool()
    assert torch.equal(got[real], want[real])
    # and the patching package's plain interchange gives the same
    full = iv.interchange(model, base, source, "layers.0", positions=[-1])
    assert torch.equal(full.logits[real], got[real])
    assert torch.equal(ours(model, DAS("layers.0", HIDDEN, 0), base, source, [-1], [-1])[real],
                       hooked(model, "layers.0", base)[0][real]), "k = 0 interchanges nothing"


def test_boundless_mask_and_annealing() -> None:
    b = BoundlessDAS("layers.0", 8, boundary=0.5, temperature=2.0, temperature_end=0.1)
    i = torch.arange(8) + 0.5
    torch.testing.assert_close(b.mask(), torch.sigmoid((0.5 * 8 - i) / 2.0))
    assert b.k == 4
    b.on_train_step(5, 10)
    assert float(b.mask.temperature) == pytest.approx(2.0 + (0.1 - 2.0) * 0.5)
    b.on_train_step(10, 10)
    assert float(b.mask.temperature) == pytest.approx(0.1)
    with torch.no_grad():
        b.mask.boundary.fill_(-3.0)  # clamped to 1e-3: no dimension interchanges
    assert b.k == 0
    rb, rs = torch.randn(3, 8), torch.randn(3, 8)
    m = b.mask()
    torch.testing.assert_close(b.mix(rb, rs), (1 - m) * rb + m * rs)


def test_training_keeps_the_rotation_orthogonal_and_the_model_frozen() -> None:
    from intervene.methods.das.fit import InterchangeForward, encode_pairs
    from intervene.training import Trainer, interchange_loss, pad_batch

    model, tok = tiny_model("llama"), _digit_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(6)

    def text(n: int) -> str:
        return " ".join(str(d) for d in torch.randint(0, 10, (n,), generator=g).tolist())

    pairs = [{"base": text(5), "source": text(4), "counterfactual": str(int(torch.randint(0, 3, (1,), generator=g)))}
             for _ in range(24)]
    das = DAS.create(model, "layers.0", 4)
    errors: list[float] = []

    def check(step: int, total: int) -> None:
        w = das.rotation()  # train mode: the parametrized matrix
        errors.append(float((w.T @ w - torch.eye(HIDDEN)).abs().max().detach()))

    trainer = Trainer(model, [das], interchange_loss, iv.DASConfig(lr=0.05, epochs=2, batch_size=6, k=4),
                      forward=InterchangeForward(das, [-1], [-1]), collate=lambda e: pad_batch(e, 0),
                      progress=False, callbacks=[check])
    start_w = das.weight().clone()
    result = trainer.fit(encode_pairs(tok, pairs))
    assert len(errors) == result.steps > 0 and max(errors) < 1e-5
    assert not torch.equal(das.weight(), start_w)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def _digit_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{str(i): i + 2 for i in range(10)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]")


def test_errors_and_bake_refusal() -> None:
    model = tiny_model("llama")
    with pytest.raises(InterventionError, match="one site"):
        DAS("layers.*", HIDDEN, 1)
    with pytest.raises(InterventionError, match="k must be"):
        DAS("layers.0", HIDDEN, HIDDEN + 1)
    das = DAS("layers.0", HIDDEN, 2)
    with pytest.raises(InterventionError, match="attach"):
        das.set_source(iv.Patch({"layers.0": torch.zeros(1, 1, HIDDEN)}, positions={"per_example": [[0]]},
                                per_example=True))
    with pytest.raises(InterventionError, match="wide"):
        iv.Intervenable(model, [DAS("layers.0", HIDDEN + 2, 1)])
    with pytest.raises(NotBakeableError, match="second run"):
        iv.Intervenable(model, [das], attach=False).bake()
    with pytest.raises(NotBakeableError, match="second run"):
        iv.Intervenable(model, [BoundlessDAS("layers.0", HIDDEN)], attach=False).bake()


@pytest.fixture(scope="module")
def demo():
    from intervene.assets import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("the demo model has not been built")
    from intervene.data.quirky import quirky_dataset

    model, tok = iv.demo_model()
    train = speaker_swap_pairs(quirky_dataset("addition", split="train", n=100, seed=0), seed=0)
    test = speaker_swap_pairs(quirky_dataset("addition", split="test", n=60, seed=1), seed=1)
    return model, tok, train, test


def test_demo_model_speaker_subspace(demo, tmp_path) -> None:
    """One rotated dimension of the last token's residual after block 0 carries who is judging: interchanging it
    makes Bob answer like Alice (the truth) and Alice like Bob on held-out questions; a random rotation's first
    dimension does nothing. Measured (examples/das_quirky.py, 300 / 150 questions): IIA 1.000 vs 0.22."""
    model, tok, train, test = demo
    das = DAS.fit(model, tok, train, "layers.0", k=1, epochs=2, progress=False)
    got = iia(das, model, tok, test)
    control = iia(DAS.create(model, "layers.0", 1, seed=5), model, tok, test)
    assert got["no_intervention"] < 0.35 and got["n_changed"] > 80
    assert got["iia"] >= 0.9 and got["iia_changed"] >= 0.9, got
    assert control["iia"] <= got["no_intervention"] + 0.1, control
    ivm = iv.Intervenable(model, [das], attach=False)
    ivm.save_pretrained(tmp_path / "das")
    (loaded,) = iv.Intervenable.load(tmp_path / "das", model, attach=False).interventions
    assert isinstance(loaded, DAS) and loaded.config["k"] == 1 and torch.equal(loaded.weight(), das.weight())
    from intervene.methods.das.fit import InterchangeForward, encode_pairs
    from intervene.training import pad_batch

    batch = pad_batch(encode_pairs(tok, test[:16]), tok.pad_token_id)
    outs = []
    for x in (das, loaded):
        with torch.no_grad(), iv.Intervenable(model, [x]) as ivm2:
            outs.append(InterchangeForward(x, [-1])(ivm2, batch).logits)
    assert torch.equal(outs[0], outs[1])


def test_cli_fit_and_eval(tmp_path) -> None:
    from intervene.assets import DEMO_MODEL_DIR
    from intervene.cli import main

    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("the demo model has not been built")
    out = tmp_path / "das"
    args = ["das", "fit", "demo", "quirky:addition", "--site", "layers.0", "--k", "1", "--epochs", "1",
            "--n-train", "40", "--n-eval", "20", "--out", str(out), "--no-progress",
            "--checkpoint-dir", str(tmp_path / "ck")]
    assert main(args) == 0
    assert (tmp_path / "ck" / "latest.json").is_file()
    first = (out / "intervene_weights.safetensors").read_bytes()
    assert main([*args, "--resume"]) == 0  # the run is complete: resuming reloads its end state
    assert (out / "intervene_weights.safetensors").read_bytes() == first
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["k"] == 1 and {"iia", "no_intervention"} <= set(metrics["held_out"])
    assert "iia" in metrics["random_rotation"]
    cfg = json.loads((out / "intervene_config.json").read_text())
    assert cfg["interventions"][0]["type"] == "das" and cfg["interventions"][0]["params"]["k"] == 1
    assert main(["das", "eval", "demo", str(out), "quirky:addition", "--n-eval", "10",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 20


@pytest.mark.parametrize("family,site", [("llama", "layers.1"), ("gpt2", "layers.0.heads"), ("opt", "layers.0.mlp")])
def test_source_patch_equals_the_patching_packages_interchange_patch(family: str, site: str) -> None:
    """DAS records its source with a forward that stops after the site; the Patch is the patching package's."""
    from intervene.methods.das.sources import source_patch
    from intervene.methods.patching import interchange_patch

    model = tiny_model(family)
    base, source = padded([6, 4, 5], seed=10), padded([3, 7, 5], seed=11)
    want = interchange_patch(model, base, source, site, [-1, 1], [-2, 0])
    got = source_patch(model, base, source, resolve_site(model, site), [-1, 1], [-2, 0])
    assert got.positions == want.positions and got.per_example
    assert torch.equal(got.values[site], want.values[site])
