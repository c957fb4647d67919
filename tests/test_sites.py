"""Site names resolve to the right modules on every family, from the table plus config."""

from __future__ import annotations

import pytest
import torch

import intervene as iv
from intervene.sites import resolve_site
from tests.tiny_models import tiny_model

# Hand-written ground truth: block path, attention output projection, MLP writer.
EXPECTED = {
    "llama": ("model.layers.1", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"),
    "llama_gqa": ("model.layers.1", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"),
    "mistral": ("model.layers.1", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"),
    "qwen2": ("model.layers.1", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"),
    "gemma": ("model.layers.1", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"),
    "phi3": ("model.layers.1", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"),
    "mixtral": ("model.layers.1", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp"),
    "gpt2": ("transformer.h.1", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers.1", "gpt_neox.layers.1.attention.dense", "gpt_neox.layers.1.mlp.dense_4h_to_h"),
    "gptj": ("transformer.h.1", "transformer.h.1.attn.out_proj", "transformer.h.1.mlp.fc_out"),
    "opt": ("model.decoder.layers.1", "model.decoder.layers.1.self_attn.out_proj", "model.decoder.layers.1.fc2"),
    "falcon": ("transformer.h.1", "transformer.h.1.self_attention.dense", "transformer.h.1.mlp.dense_4h_to_h"),
    "bloom": ("transformer.h.1", "transformer.h.1.self_attention.dense", "transformer.h.1.mlp.dense_4h_to_h"),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_canonical_sites(family: str) -> None:
    m = tiny_model(family)
    block, attn, mlp = EXPECTED[family]
    s = resolve_site(m, "layers.1")
    assert (s.module_path, s.side) == (block, "output") and s.module is m.get_submodule(block)
    assert (resolve_site(m, "layers.1:input").module_path, resolve_site(m, "layers.1:input").side) == (block, "input")
    assert resolve_site(m, "layers.1.attn").module_path == attn
    assert resolve_site(m, "layers.1.mlp").module_path == mlp
    heads = resolve_site(m, "layers.1.heads")
    assert heads.module_path == attn and heads.side == "input"
    n_heads, head_dim = heads.heads
    assert n_heads == 4
    assert n_heads * head_dim == (m.get_submodule(attn).in_features if hasattr(m.get_submodule(attn), "in_features")
                                  else m.get_submodule(attn).weight.shape[0])


def test_heads_with_gqa_and_wide_heads() -> None:
    gqa = tiny_model("llama_gqa")
    assert gqa.config.num_key_value_heads == 2
    assert resolve_site(gqa, "layers.0.heads").heads == (4, 8)
    gemma = tiny_model("gemma")  # head_dim 16 * 4 heads = 64 != hidden 32
    assert resolve_site(gemma, "layers.0.heads").heads == (4, 16)


def test_wildcards_expand_in_layer_order() -> None:
    m = tiny_model("llama")
    assert iv.expand_sites(m, "layers.*") == ["layers.0", "layers.1"]
    assert iv.expand_sites(m, ["layers.*.heads", "layers.0"]) == ["layers.0.heads", "layers.1.heads", "layers.0"]
    assert [s.module_path for s in iv.resolve_sites(m, "layers.*.mlp")] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_raw_module_paths() -> None:
    m = tiny_model("gpt2")
    s = resolve_site(m, "transformer.h.0.attn.c_proj:input")
    assert s.side == "input" and s.module is m.transformer.h[0].attn.c_proj and s.width == 32
    assert resolve_site(m, "transformer.ln_f").side == "output"
    assert resolve_site(m, "transformer.ln_f:output").side == "output"


@pytest.mark.parametrize("bad", ["layers.7", "layers.0.foo", "blocks.0", "layers.x", "transformer.h.9",
                                 "transformer.h.0:sideways"])
def test_unknown_site_lists_valid_names(bad: str) -> None:
    m = tiny_model("gpt2")
    with pytest.raises(iv.SiteError) as e:
        iv.resolve_sites(m, bad)
    msg = str(e.value)
    assert bad.split(":")[0] in msg or "suffix" in msg
    if "suffix" not in msg:
        assert "layers.{0..1}" in msg and "layers.{0..1}.heads" in msg


def test_wildcard_without_match_is_an_error() -> None:
    with pytest.raises(iv.SiteError):
        iv.expand_sites(tiny_model("llama"), "layers.*.nothing")


def test_unknown_family_is_discovered_and_register_family_overrides() -> None:
    m = tiny_model("llama")
    cfg_type = m.config.model_type
    try:
        m.config.model_type = "my_new_arch"  # not in the table: discovery finds the same modules
        assert resolve_site(m, "layers.1.heads").module_path == "model.layers.1.self_attn.o_proj"
        assert resolve_site(m, "layers.1.heads").heads == (4, 8)
        assert resolve_site(m, "layers.0.mlp").module_path == "model.layers.0.mlp.down_proj"
        # raw paths still work
        assert resolve_site(m, "model.layers.0").module is m.model.layers[0]
        iv.register_family("my_new_arch", iv.Family("model.layers", "self_attn.o_proj", "mlp.up_proj",
                                                     "model.embed_tokens"))
        assert resolve_site(m, "layers.1.mlp").module_path == "model.layers.1.mlp.up_proj"  # the table wins
    finally:
        m.config.model_type = cfg_type
        from intervene.sites import FAMILIES as table
        table.pop("my_new_arch", None)


def test_undiscoverable_structure_names_register_family() -> None:
    cfg = tiny_model("llama").config.to_dict()
    with torch.device("meta"):
        m = type(tiny_model("llama"))(type(tiny_model("llama").config).from_dict(cfg))
    m.config.model_type = "my_meta_arch"
    with pytest.raises(iv.UnsupportedModelError, match="register_family") as e:
        resolve_site(m, "layers.0")
    assert "meta device" in str(e.value)
    assert resolve_site(m, "model.layers.0").module is m.model.layers[0]  # raw paths need no structure


def test_bare_base_model_resolves() -> None:
    base = tiny_model("llama").model  # LlamaModel, no LM head
    assert resolve_site(base, "layers.1").module is base.layers[1]


def test_block_output_hook_sees_tuple_and_tensor_outputs() -> None:
    # GPT-J / Falcon / BLOOM blocks return tuples, Llama a tensor; both must be editable.
    for fam in ("gptj", "bloom", "llama"):
        m = tiny_model(fam)
        ids = torch.tensor([[1, 2, 3]])
        v = torch.ones(32)
        with iv.Intervenable(m, iv.Steering({"layers.1": v}, scale=0.5)) as ivm:
            edited = ivm(input_ids=ids).logits
        assert not torch.equal(edited, m(input_ids=ids).logits)
