"""SAEs: both on-disk layouts against hand computations, Hub loading, named errors, and the two latent
interventions (decoder-row steering, the exact clamp) checked against reference hooks and round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import intervene as iv
from intervene.features import (
    SAE,
    SAEFormatError,
    load_sae,
    save_sae,
    site_from_hook_name,
)
from intervene.features.sae import DEMO_SAE_DIR
from intervene.methods.sae_clamp import LatentClamp, steering_from_sae
from tests.tiny_models import HIDDEN, tiny_model

D_SAE = 48



def rand_sae(activation: str = "relu", site: str = "layers.1", seed: int = 0, d_in: int = HIDDEN) -> SAE:
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, D_SAE, generator=g) / d_in ** 0.5
    b_enc = torch.randn(D_SAE, generator=g) * 0.1
    W_dec = torch.randn(D_SAE, d_in, generator=g) / D_SAE ** 0.5
    b_dec = torch.randn(d_in, generator=g) * 0.1
    thr = torch.rand(D_SAE, generator=g) * 0.2 if activation == "jumprelu" else None
    return SAE(W_enc, b_enc, W_dec, b_dec, activation=activation, k=5 if activation == "topk" else None,
               threshold=thr, site=site)


def x_rand(n: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


# ---- layouts ---------------------------------------------------------------------------------
def test_sparsify_layout_matches_hand_computation(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    enc_w, enc_b = torch.randn(D_SAE, HIDDEN, generator=g), torch.randn(D_SAE, generator=g)
    W_dec, b_dec = torch.randn(D_SAE, HIDDEN, generator=g), torch.randn(HIDDEN, generator=g)
    folder = tmp_path / "layers.1"
    folder.mkdir()
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
                                                 "num_latents": D_SAE, "k": 4, "multi_topk": False,
                                                 "skip_connection": False, "transcode": False, "d_in": HIDDEN}))
    sae = load_sae(tmp_path, site=None, hookpoint="layers.1")
    assert sae.site == "layers.1" and sae.activation == "topk" and sae.k == 4 and sae.meta["layout"] == "sparsify"
    x = x_rand()
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    vals, idx = pre.topk(4, dim=-1)
    want = torch.zeros(x.shape[0], D_SAE).scatter_(-1, idx, vals)
    torch.testing.assert_close(sae.encode(x), want)
    torch.testing.assert_close(sae(x), want @ W_dec + b_dec)
    rows, lat, v = sae.encode_sparse(x)
    dense = torch.zeros_like(want)
    dense[rows, lat] = v
    torch.testing.assert_close(dense, want)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_saelens_layout_matches_hand_computation(tmp_path: Path, arch: str) -> None:
    g = torch.Generator().manual_seed(1)
    W_enc, b_enc = torch.randn(HIDDEN, D_SAE, generator=g), torch.randn(D_SAE, generator=g)
    W_dec, b_dec = torch.randn(D_SAE, HIDDEN, generator=g), torch.randn(HIDDEN, generator=g)
    thr = torch.rand(D_SAE, generator=g) * 2
    t = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    cfg = {"architecture": arch, "d_in": HIDDEN, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.0.hook_resid_post"}}
    if arch == "jumprelu":
        t["threshold"] = thr
    if arch == "topk":
        cfg["k"] = 6
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path, model=tiny_model("llama"))
    assert sae.site == "layers.0" and sae.meta["layout"] == "saelens"
    x = x_rand()
    pre = (x - b_dec) @ W_enc + b_enc
    if arch == "standard":
        want = torch.relu(pre)
    elif arch == "jumprelu":
        want = torch.relu(pre) * (pre > thr)
    else:
        vals, idx = pre.topk(6, dim=-1)
        want = torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
    torch.testing.assert_close(sae.encode(x), want)
    torch.testing.assert_close(sae.decode(want), want @ W_dec + b_dec)


@pytest.mark.parametrize("layout", ["sparsify", "saelens"])
@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_save_load_round_trip(tmp_path: Path, layout: str, activation: str) -> None:
    sae = rand_sae(activation)
    if layout == "sparsify" and activation != "topk":  # sparsify has no ReLU / JumpReLU SAE: refused, not mis-written
        with pytest.raises(SAEFormatError, match="sparsify has only top-k and groupmax"):
            save_sae(sae, tmp_path, layout=layout)
        assert not (tmp_path / "sae.safetensors").exists()
        return
    back = load_sae(save_sae(sae, tmp_path / "s", layout=layout))
    assert back.site == "layers.1" and back.activation == activation
    x = x_rand()
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    torch.testing.assert_close(back(x), sae(x))


def test_saelens_transcoder_reads_and_writes_different_sites(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    t = {"W_enc": torch.randn(HIDDEN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g),
         "W_dec": torch.randn(D_SAE, HIDDEN, generator=g), "b_dec": torch.randn(HIDDEN, generator=g)}
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "transcoder", "d_in": HIDDEN, "d_sae": D_SAE, "d_out": HIDDEN,
        "hook_name": "blocks.1.hook_resid_pre", "hook_name_out": "blocks.1.hook_mlp_out"}))
    sae = load_sae(tmp_path, model=tiny_model("llama"))
    assert (sae.site, sae.output_site, sae.apply_b_dec_to_input) == ("layers.1:input", "layers.1.mlp", False)
    x = x_rand()
    torch.testing.assert_close(sae.encode(x), torch.relu(x @ t["W_enc"] + t["b_enc"]))
    steer = steering_from_sae(sae, 3, scale=2.0)
    assert steer.sites == ["layers.1.mlp"]
    with pytest.raises(iv.InterventionError, match="transcoder"):
        LatentClamp(sae, 3)


def test_hook_names_translate() -> None:
    assert site_from_hook_name("blocks.3.hook_resid_post") == "layers.3"
    assert site_from_hook_name("blocks.3.hook_resid_pre") == "layers.3:input"
    assert site_from_hook_name("blocks.3.hook_mlp_out") == "layers.3.mlp"
    assert site_from_hook_name("blocks.3.attn.hook_z") == "layers.3.heads"
    assert site_from_hook_name("layers.7.mlp") == "layers.7.mlp"
    assert site_from_hook_name("blocks.3.hook_resid_mid") is None  # a module path: needs the model
    assert site_from_hook_name("blocks.1.hook_resid_mid", tiny_model("llama")) == \
        "model.layers.1.post_attention_layernorm:input"


# ---- errors ----------------------------------------------------------------------------------
def test_named_errors(tmp_path: Path) -> None:
    save_file({"weird": torch.zeros(2)}, str(tmp_path / "sae.bin.safetensors"))
    with pytest.raises(SAEFormatError, match="unknown SAE layout"):
        load_sae(tmp_path, site="layers.0")
    assert issubclass(SAEFormatError, iv.InterveneError)
    narrow = save_sae(rand_sae(d_in=16, site="layers.0"), tmp_path / "narrow")
    with pytest.raises(SAEFormatError, match="width 16 but site 'layers.0'.*width 32"):
        load_sae(narrow, model=tiny_model("llama"))
    with pytest.raises(SAEFormatError, match="does not resolve"):
        load_sae(save_sae(rand_sae(site="layers.9"), tmp_path / "far"), model=tiny_model("llama"))
    gated = tmp_path / "gated"
    gated.mkdir()
    save_file({"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4),
               "b_dec": torch.zeros(4)}, str(gated / "sae_weights.safetensors"))
    (gated / "cfg.json").write_text(json.dumps({"architecture": "abstopk", "d_in": 4, "d_sae": 8}))
    with pytest.raises(SAEFormatError, match="architecture 'abstopk' is not supported"):
        load_sae(gated)
    (gated / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 4, "d_sae": 8}))
    with pytest.raises(SAEFormatError, match=r"missing \['b_gate', 'b_mag', 'r_mag'\]"):
        load_sae(gated)
    with pytest.raises(SAEFormatError, match="not a Hub repo id"):
        load_sae(tmp_path / "missing" / "deeper" / "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SAEFormatError, match="no SAE weights|several or no SAEs"):
        load_sae(empty)


def test_load_from_hub_with_hookpoint_and_revision(hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("user/saes")
    repo_dir = tmp_path / "repo"
    for layer in (0, 1):
        save_sae(rand_sae("topk", site=f"layers.{layer}", seed=layer), repo_dir / f"layers.{layer}")
    first = api.upload_folder(folder_path=str(repo_dir), repo_id="user/saes").oid
    save_sae(rand_sae("topk", site="layers.1", seed=7), repo_dir / "layers.1")
    api.upload_folder(folder_path=str(repo_dir), repo_id="user/saes")
    x = x_rand()
    sae = load_sae("user/saes", site="layers.1", model=tiny_model("llama"))
    torch.testing.assert_close(sae.encode(x), rand_sae("topk", seed=7).encode(x))
    old = load_sae("user/saes", hookpoint="layers.1", revision=first)
    assert old.site == "layers.1"
    torch.testing.assert_close(old.encode(x), rand_sae("topk", seed=1).encode(x))
    with pytest.raises(SAEFormatError, match="several or no SAEs"):
        load_sae("user/saes")
    with pytest.raises(SAEFormatError, match="no Hub repo"):
        load_sae("user/nothing-here")


# ---- interventions ---------------------------------------------------------------------------
BATCH = {"input_ids": torch.tensor([[0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26]]),
         "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])}


def _ref_logits(model, fn) -> torch.Tensor:
    """Logits with a plain hook replacing block 1's output ``h`` by ``fn(h)`` on real tokens."""
    mask = BATCH["attention_mask"].bool()[..., None]

    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        new = torch.where(mask, fn(h), h)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        return model(**BATCH).logits
    finally:
        handle.remove()


def _edited(model, intervention) -> torch.Tensor:
    with iv.Intervenable(model, intervention) as ivm:
        return ivm(**BATCH).logits


def test_steering_from_sae_uses_the_decoder_row() -> None:
    sae = rand_sae()
    row = sae.W_dec[5]
    steer = steering_from_sae(sae, 5, scale=3.0, positions="all")
    assert isinstance(steer, iv.Steering) and steer.sites == ["layers.1"]
    torch.testing.assert_close(steer.vectors["layers.1"], row / row.norm())
    raw = steering_from_sae(sae, 5, scale=3.0, unit=False)
    torch.testing.assert_close(raw.vectors["layers.1"], row)
    model = tiny_model("llama")
    got = _edited(model, raw)
    want = _ref_logits(model, lambda h: h + 3.0 * row)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_clamp_equals_hand_computation(activation: str) -> None:
    model = tiny_model("llama")
    sae = rand_sae(activation)
    # pick latents that actually fire on this batch, so the edit is not trivially zero
    with torch.no_grad():
        h = model(**BATCH, output_hidden_states=True).hidden_states[2]
    live = sae.encode(h).sum((0, 1)).argsort(descending=True)[:2].tolist()
    clamp = LatentClamp(sae, live, values=[0.0, 4.0])

    def reference(h: torch.Tensor) -> torch.Tensor:
        z = sae.encode(h)
        z2 = z.clone()
        z2[..., live[0]], z2[..., live[1]] = 0.0, 4.0
        full = h + sae.decode(z2) - sae.decode(z)  # the definition
        by_rows = h + (0.0 - z[..., live[0], None]) * sae.W_dec[live[0]] + (4.0 - z[..., live[1], None]) * sae.W_dec[live[1]]
        torch.testing.assert_close(full, by_rows, atol=1e-5, rtol=1e-5)
        return full

    got = _edited(model, clamp)
    want = _ref_logits(model, reference)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, model(**BATCH).logits, atol=1e-3)


def test_clamp_to_current_value_and_out_of_positions_is_a_no_op() -> None:
    model = tiny_model("llama")
    sae = rand_sae("relu")
    base = model(**BATCH).logits
    with torch.no_grad():
        h = model(**BATCH, output_hidden_states=True).hidden_states[2]
    dead = int((sae.encode(h).amax((0, 1)) == 0).nonzero()[0]) if (sae.encode(h).amax((0, 1)) == 0).any() else None
    if dead is not None:  # clamping a silent latent to 0 changes nothing, bit for bit
        assert torch.equal(_edited(model, LatentClamp(sae, dead, 0.0)), base)
    last = _edited(model, LatentClamp(sae, 0, 5.0, positions="last"))
    assert torch.equal(last[:, :-1], base[:, :-1]) and not torch.equal(last[:, -1], base[:, -1])


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_clamp_round_trip_stores_only_what_it_needs(tmp_path: Path, activation: str) -> None:
    from safetensors.torch import load_file

    model = tiny_model("llama")
    sae = rand_sae(activation)
    ivm = iv.Intervenable(model, [LatentClamp(sae, [3, 9], values=2.5, positions="prompt", name="clamp"),
                                  steering_from_sae(sae, 4, scale=-1.5, name="steer")], attach=False)
    want = ivm(**BATCH).logits
    ivm.save_pretrained(tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "intervene_weights.safetensors")).items()}
    width = D_SAE if activation == "topk" else 2
    assert shapes["clamp.enc_w"] == (HIDDEN, width) and shapes["clamp.dec_w"] == (2, HIDDEN)
    assert ("clamp.threshold" in shapes) == (activation == "jumprelu")
    back = iv.Intervenable.load(tmp_path, model)
    try:
        assert isinstance(back["clamp"], LatentClamp) and back["clamp"].latents == [3, 9]
        assert torch.equal(back(**BATCH).logits, want)
    finally:
        back.detach()


def test_clamp_on_bf16_model_keeps_dtype() -> None:
    model = tiny_model("llama", torch.bfloat16)
    out = _edited(model, LatentClamp(rand_sae("relu"), [1, 2], 3.0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_clamp_rejects_wrong_width_and_bad_latents() -> None:
    with pytest.raises(iv.InterventionError, match="distinct indices"):
        LatentClamp(rand_sae(), [1, 1])
    with pytest.raises(iv.InterventionError, match="2 values for 1 latents"):
        LatentClamp(rand_sae(), 1, [1.0, 2.0])
    narrow = LatentClamp(rand_sae(d_in=16, site="layers.0"), 1)
    with pytest.raises(iv.InterventionError, match="width 16"):
        iv.Intervenable(tiny_model("llama"), narrow, attach=False).attach()


# ---- the shipped SAE -------------------------------------------------------------------------
@pytest.mark.skipif(not (DEMO_SAE_DIR / "cfg.json").is_file(), reason="demo SAE not built")
def test_demo_sae_reconstructs_the_demo_model() -> None:
    from intervene.assets import demo_model
    from intervene.data.neutral import neutral_corpus

    model, tok = demo_model()
    sae = load_sae("demo", model=model)
    assert sae.site is not None and sum(f.stat().st_size for f in DEMO_SAE_DIR.iterdir()) < 1_000_000
    batch = tok(neutral_corpus(32, seed=123, split="test"), return_tensors="pt", padding=True)
    layer = int(sae.site.split(".")[1])
    with torch.no_grad():
        h = model(**batch, output_hidden_states=True).hidden_states[layer + 1][batch["attention_mask"].bool()]
        err, var = ((sae(h) - h) ** 2).sum(1), ((h - h.mean(0)) ** 2).sum(1)
    fvu = float(err.sum() / var.sum())
    se = float(((err - fvu * var) / var.mean()).std()) / len(err) ** 0.5  # a ratio of means: its linearisation
    # Measured 0.0296 (SE 0.0018) on these 326 held-out tokens, the SAE's training figure being 0.0229 (cfg.json,
    # recomputed in tests/test_figures_card.py); a worse reconstruction than 2 SE above it is a regression.
    # (This was < 0.35, ten times the measurement.)
    assert fvu <= 0.0296 + 2 * se, f"FVU {fvu:.4f} (SE {se:.4f})"


def test_latent_clamp_refuses_groupmax_saes() -> None:
    g = torch.Generator().manual_seed(0)
    sae = SAE(torch.randn(HIDDEN, D_SAE, generator=g), torch.zeros(D_SAE), torch.randn(D_SAE, HIDDEN, generator=g),
              torch.zeros(HIDDEN), activation="groupmax", k=4, site="layers.1")
    with pytest.raises(iv.InterventionError, match="groupmax"):
        LatentClamp(sae, 3)
