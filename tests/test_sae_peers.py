"""Side by side with the peers installed from PyPI: SAEs saved by SAELens / sparsify load here and encode, decode
and predict what the peer's own loader gives; SAEs saved here load in the peer and give what they give here.

``MAX_DELTA`` collects the largest |Δ| per case (printed with ``-s``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from intervene.features import SAEFormatError, load_sae, save_sae
from intervene.features.sae import SAE
from tests.peers import need
from tests.tiny_models import HIDDEN, tiny_model

D_SAE = 48
MAX_DELTA: dict[str, float] = {}


def x_in(n: int = 64, seed: int = 9) -> torch.Tensor:
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed))


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name == "threshold":
                r = r.abs() * 0.3
            elif name in ("r_mag", "b_gate", "b_mag", "b_enc", "encoder.bias"):
                r = r * 0.3
            elif p.ndim == 2:
                r = r / math.sqrt(p.shape[0])
            p.copy_(r)


def record(case: str, *pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
    delta = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
    MAX_DELTA[case] = delta
    print(f"{case}: max |delta| {delta:.3g}")
    return delta


# ---- SAELens ---------------------------------------------------------------------------------
def saelens_model(arch: str, training: bool = False, rescale: bool = False):
    need("sae_lens")
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    hook, hook_out = "blocks.1.hook_resid_post", None
    if "transcoder" in arch:
        hook, hook_out = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"
    meta = SAEMetadata(hook_name=hook, **({"hook_name_out": hook_out} if hook_out else {}))
    if training:  # what SAELens's trainer writes for a checkpoint: rescale_acts_by_decoder_norm defaults to True
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=HIDDEN, d_sae=D_SAE, k=6, metadata=meta))
    from sae_lens.registry import get_sae_class

    sae_cls, cfg_cls = get_sae_class(arch)
    kw = {"d_in": HIDDEN, "d_sae": D_SAE, "metadata": meta}
    if arch == "topk":
        kw.update(k=6, rescale_acts_by_decoder_norm=rescale)
    if "transcoder" in arch:
        kw.update(d_out=HIDDEN, apply_b_dec_to_input=False)
    return sae_cls(cfg_cls(**kw))


SAELENS_CASES = [("standard", False, False), ("gated", False, False), ("jumprelu", False, False),
                 ("topk", False, False), ("topk", False, True), ("topk", True, True), ("transcoder", False, False),
                 ("skip_transcoder", False, False), ("jumprelu_transcoder", False, False),
                 ("jumprelu_skip_transcoder", False, False)]


@pytest.mark.parametrize("arch,training,rescale", SAELENS_CASES)
def test_saelens_saved_loads_here(tmp_path: Path, arch: str, training: bool, rescale: bool) -> None:
    sl = need("sae_lens")
    peer = saelens_model(arch, training, rescale)
    randomize(peer, seed=len(arch))
    peer.save_model(tmp_path)
    ref = sl.SAE.load_from_disk(tmp_path)  # SAELens's own loader: what a SAELens user gets
    ours = load_sae(tmp_path, model=tiny_model("llama"))
    x = x_in()
    with torch.no_grad():
        z_ref, z = ref.encode(x), ours.encode(x)
        out_ref = ref(x)
    assert torch.equal(z_ref > 0, z > 0), "different active latents"
    case = f"saelens {arch}" + (" training checkpoint" if training else "") + (" rescaled" if rescale else "")
    delta = record(case, (z, z_ref), (ours.decode(z, x) if ours.W_skip is not None else ours.decode(z),
                                      out_ref), (ours(x), out_ref))
    assert delta < 1e-5
    assert ours.site == ("layers.1" if "transcoder" not in arch else "model.layers.1.post_attention_layernorm:input")


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "transcoder", "skip_transcoder",
                                  "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saved_here_loads_in_saelens(tmp_path: Path, arch: str) -> None:
    sl = need("sae_lens")
    peer = saelens_model(arch)
    randomize(peer, seed=3)
    peer.save_model(tmp_path / "peer")
    ours = load_sae(tmp_path / "peer", model=tiny_model("llama"), site="layers.1:input" if "transcoder" in arch
                    else None)
    save_sae(ours, tmp_path / "ours", layout="saelens")
    back = sl.SAE.load_from_disk(tmp_path / "ours")
    x = x_in(seed=2)
    with torch.no_grad():
        delta = record(f"ours -> saelens {arch}", (back.encode(x), ours.encode(x)), (back(x), ours(x)))
    assert delta < 1e-5 and type(back).__name__ == type(peer).__name__


def test_saelens_refusals(tmp_path: Path) -> None:
    need("sae_lens")
    import json

    peer = saelens_model("topk", rescale=True)
    randomize(peer)
    peer.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key, value, match in [("some_new_option", True, r"keys \['some_new_option'\] are not understood"),
                              ("normalize_activations", "layer_norm", "normalize_activations"),
                              ("architecture", "abstopk", "architecture 'abstopk' is not supported")]:
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(SAEFormatError, match=match):
            load_sae(tmp_path)
    meta = {**cfg["metadata"], "model_from_pretrained_kwargs": {"center_writing_weights": True}}
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "metadata": meta}))
    with pytest.raises(SAEFormatError, match="center_writing_weights"):
        load_sae(tmp_path)
    meta = {**cfg["metadata"], "hook_head_index": 2}
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "metadata": meta}))
    with pytest.raises(SAEFormatError, match="one attention head"):
        load_sae(tmp_path)
    groupmax = SAE(torch.randn(HIDDEN, D_SAE), torch.randn(D_SAE), torch.randn(D_SAE, HIDDEN), torch.randn(HIDDEN),
                   activation="groupmax", k=4, site="layers.1")
    with pytest.raises(SAEFormatError, match="SAELens has no 'groupmax'"):
        save_sae(groupmax, tmp_path / "g", layout="saelens")


# ---- sparsify --------------------------------------------------------------------------------
def sparsify_model(activation: str, transcode: bool = False, skip: bool = False):
    sp = need("sparsify")
    cfg = sp.SparseCoderConfig(activation=activation, k=6, num_latents=D_SAE, transcode=transcode,
                               skip_connection=skip)
    return sp.SparseCoder(HIDDEN, cfg)


def sparsify_dense(coder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's encoding as a dense matrix, and its prediction (decode + skip, as in its forward)."""
    with torch.no_grad():
        acts, idx, _ = coder.encode(x)
        z = torch.zeros(x.shape[0], coder.num_latents).scatter_(-1, idx, acts)
        y = coder.decode(acts, idx)
        if coder.W_skip is not None:
            y = y + x @ coder.W_skip.mT
    return z, y


SPARSIFY_CASES = [("topk", False, False), ("groupmax", False, False), ("topk", True, True), ("groupmax", True, False)]


@pytest.mark.parametrize("activation,transcode,skip", SPARSIFY_CASES)
def test_sparsify_both_ways(tmp_path: Path, activation: str, transcode: bool, skip: bool) -> None:
    sp = need("sparsify")
    coder = sparsify_model(activation, transcode, skip)
    randomize(coder, seed=5)
    coder.save_to_disk(tmp_path / "layers.1.mlp" if transcode else tmp_path / "layers.1")
    folder = next(tmp_path.iterdir())
    ours = load_sae(folder, site="model.layers.1.mlp:input" if transcode else None)
    x = x_in(seed=4)
    z_ref, y_ref = sparsify_dense(coder, x)
    name = f"sparsify {activation}" + (" transcoder" if transcode else "") + (" skip" if skip else "")
    assert record(name, (ours.encode(x), z_ref), (ours(x), y_ref)) < 1e-5
    assert ours.activation == activation and (ours.output_site == "layers.1.mlp") == transcode
    back = sp.SparseCoder.load_from_disk(save_sae(ours, tmp_path / "ours", layout="sparsify"))
    z_back, y_back = sparsify_dense(back, x)
    assert record(f"ours -> {name}", (z_back, ours.encode(x)), (y_back, ours(x))) < 1e-5
    if transcode:  # our input site survives the round trip (sparsify names only the replaced module)
        assert load_sae(tmp_path / "ours").site == "model.layers.1.mlp:input"


def test_sparsify_refuses_what_it_cannot_express(tmp_path: Path) -> None:
    from tests.test_sae import rand_sae

    for act in ("relu", "jumprelu"):
        with pytest.raises(SAEFormatError, match="sparsify has only top-k and groupmax"):
            save_sae(rand_sae(act), tmp_path / act, layout="sparsify")
    wide = SAE(torch.randn(HIDDEN, D_SAE), torch.randn(D_SAE), torch.randn(D_SAE, 16), torch.randn(16),
               activation="topk", k=4, site="layers.0", output_site="layers.0.mlp", apply_b_dec_to_input=False)
    with pytest.raises(SAEFormatError, match="as wide as they read"):
        save_sae(wide, tmp_path / "wide", layout="sparsify")
    # the default layout picks one that can express the SAE
    assert (save_sae(rand_sae("relu"), tmp_path / "auto") / "sae_weights.safetensors").is_file()
