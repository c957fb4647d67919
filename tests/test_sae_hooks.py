"""SAELens hook names land on the right activations: each TransformerLens hook's value is derived by hand from
plain PyTorch hooks on a tiny Llama and GPT-2 (TransformerLens's definitions: resid_mid = block input + attention
output, hook_mlp_in = resid_mid, ln2.hook_normalized = resid_mid normalized *before* the norm's gain and bias),
and an SAE saved with that hook name must encode exactly that value at the site it is loaded on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from intervene.features import SAEFormatError, cache_latents, load_sae, site_from_hook_name
from tests.tiny_models import HIDDEN, tiny_model

D_SAE = 24
TOKENS = torch.randint(3, 90, (3, 9), generator=torch.Generator().manual_seed(4))


def tl_values(family: str, layer: int) -> dict[str, torch.Tensor]:
    """TransformerLens's hook values of block ``layer``, ``[n_tokens, d]`` each, derived from HF submodules."""
    model = tiny_model(family)
    block = model.model.layers[layer] if family == "llama" else model.transformer.h[layer]
    attn = block.self_attn if family == "llama" else block.attn
    o_proj = attn.o_proj if family == "llama" else attn.c_proj
    got: dict[str, torch.Tensor] = {}

    def keep(key: str, x) -> None:  # hooks must return None: only record
        got[key] = x[0] if isinstance(x, tuple) else x

    handles = [
        block.register_forward_pre_hook(lambda m, a, kw: keep("pre", a[0] if a else kw["hidden_states"]),
                                        with_kwargs=True),
        block.register_forward_hook(lambda m, a, o: keep("post", o)),
        attn.register_forward_hook(lambda m, a, o: keep("attn", o)),
        block.mlp.register_forward_hook(lambda m, a, o: keep("mlp", o)),
        o_proj.register_forward_pre_hook(lambda m, a: keep("z", a)),
    ]
    try:
        with torch.no_grad():
            model(input_ids=TOKENS)
    finally:
        for h in handles:
            h.remove()
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in got.items()}
    mid = flat["pre"] + flat["attn"]
    if family == "llama":
        normed = mid / torch.sqrt(mid.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)
    else:
        c = mid - mid.mean(-1, keepdim=True)
        normed = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + model.config.layer_norm_epsilon)
    torch.testing.assert_close(mid + flat["mlp"], flat["post"], atol=1e-5, rtol=1e-5)  # the block is sequential
    return {"hook_resid_pre": flat["pre"], "hook_resid_mid": mid, "hook_mlp_in": mid, "hook_resid_post": flat["post"],
            "hook_attn_out": flat["attn"], "hook_mlp_out": flat["mlp"], "attn.hook_z": flat["z"],
            "ln2.hook_normalized": normed}


def saelens_folder(folder: Path, hook: str, *, transcoder: bool = False, skip: bool = False, seed: int = 0,
                   d_in: int = HIDDEN) -> dict[str, torch.Tensor]:
    """A SAELens-6 folder (standard SAE, or transcoder to ``hook_mlp_out``) with random weights; returns them."""
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_in, D_SAE, generator=g) / d_in ** 0.5, "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
         "W_dec": torch.randn(D_SAE, HIDDEN, generator=g), "b_dec": torch.randn(HIDDEN, generator=g)}
    meta = {"sae_lens_version": "6.5.0", "hook_name": hook}
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": not transcoder, "normalize_activations": "none", "metadata": meta,
           "reshape_activations": "hook_z" if hook.endswith("hook_z") else "none"}
    if transcoder:
        cfg.update(architecture="skip_transcoder" if skip else "transcoder", d_out=HIDDEN)
        meta["hook_name_out"] = hook.split(".")[0] + "." + hook.split(".")[1] + ".hook_mlp_out"
        if skip:
            t["W_skip"] = torch.randn(HIDDEN, d_in, generator=g) * 0.1
    folder.mkdir(parents=True)
    save_file(t, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


def reference_encode(x: torch.Tensor, t: dict[str, torch.Tensor], subtract_b_dec: bool) -> torch.Tensor:
    return torch.relu((x - t["b_dec"] if subtract_b_dec else x) @ t["W_enc"] + t["b_enc"])


HOOKS = ["hook_resid_pre", "hook_resid_mid", "hook_mlp_in", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
         "attn.hook_z", "ln2.hook_normalized"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("hook", HOOKS)
def test_each_hook_encodes_transformerlens_value(tmp_path: Path, family: str, hook: str) -> None:
    model, layer = tiny_model(family), 1
    name = f"blocks.{layer}.{hook}"
    t = saelens_folder(tmp_path / "sae", name)
    sae = load_sae(tmp_path / "sae", model=model)
    assert sae.site is not None
    x = tl_values(family, layer)[hook]
    cache = cache_latents(model, sae, TOKENS, tmp_path / "cache", progress=False)
    torch.testing.assert_close(cache.dense(), reference_encode(x, t, True), atol=2e-5, rtol=2e-5)
    if hook == "ln2.hook_normalized":  # the autoencoder also writes back where it reads: the norm's output
        norm = model.model.layers[layer].post_attention_layernorm if family == "llama" else model.transformer.h[layer].ln_2
        w = norm.weight.detach()
        b = torch.zeros_like(w) if family == "llama" else norm.bias.detach()
        want = (reference_encode(x, t, True) @ t["W_dec"] + t["b_dec"]) * w + b
        torch.testing.assert_close(sae(x * w + b), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("hook", ["hook_mlp_in", "ln2.hook_normalized", "hook_resid_mid"])
def test_transcoder_inputs_with_skip(tmp_path: Path, family: str, hook: str) -> None:
    model, layer = tiny_model(family), 0
    t = saelens_folder(tmp_path / "tc", f"blocks.{layer}.{hook}", transcoder=True, skip=True, seed=1)
    tc = load_sae(tmp_path / "tc", model=model)
    assert tc.output_site == f"layers.{layer}.mlp"
    vals = tl_values(family, layer)
    x = vals[hook]
    cache = cache_latents(model, tc, TOKENS, tmp_path / "cache", progress=False)
    z = reference_encode(x, t, False)
    torch.testing.assert_close(cache.dense(), z, atol=2e-5, rtol=2e-5)
    # the prediction of hook_mlp_out, from the value at the loaded site (the norm's output for hook_normalized)
    if hook == "ln2.hook_normalized":
        norm = model.model.layers[layer].post_attention_layernorm if family == "llama" else model.transformer.h[layer].ln_2
        y = x * norm.weight.detach() + (0 if family == "llama" else norm.bias.detach())
    else:
        y = x
    torch.testing.assert_close(tc(y), z @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T, atol=2e-5, rtol=2e-5)


def test_module_path_hooks_need_the_model_and_unknown_hooks_are_refused(tmp_path: Path) -> None:
    saelens_folder(tmp_path / "mid", "blocks.0.hook_resid_mid")
    with pytest.raises(SAEFormatError, match="pass model="):
        load_sae(tmp_path / "mid")
    assert load_sae(tmp_path / "mid", site="layers.0").site == "layers.0"  # an explicit site is taken as is
    saelens_folder(tmp_path / "q", "blocks.0.attn.hook_q")
    with pytest.raises(SAEFormatError, match="not a TransformerLens hook this loader translates"):
        load_sae(tmp_path / "q", model=tiny_model("llama"))
    assert site_from_hook_name("blocks.0.hook_resid_mid", tiny_model("gpt2")) == "transformer.h.0.ln_2:input"
    # parallel blocks (GPT-J): no resid_mid; hook_mlp_in is resid_pre
    assert site_from_hook_name("blocks.1.hook_mlp_in", tiny_model("gptj")) == "layers.1:input"
    saelens_folder(tmp_path / "gptj", "blocks.1.hook_resid_mid")
    with pytest.raises(SAEFormatError, match="in parallel"):
        load_sae(tmp_path / "gptj", model=tiny_model("gptj"))
