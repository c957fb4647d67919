"""Automatic site discovery: hand-written expectations for families outside the table, the table
families rediscovered, exact steering and baking through discovery, and refusals that name the cause.

References are plain PyTorch hooks on module paths written out below, never intervene's own code.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import intervene as iv
from intervene.bake import bake_with_report
from intervene.sites import FAMILIES, layer_parts, num_layers, resolve_site, site_names
from intervene.sites.discovery import discover
from tests.coverage_build import IDS, build
from tests.site_reference import hooked_logits
from tests.tiny_models import CONFIGS, tiny_model

# model_type -> (block list, attn writer, mlp writer, attention output projection, heads, MLP parallel to attn)
DISCOVERED = {
    "smollm3": ("model.layers", "self_attn.o_proj", "mlp.down_proj", "self_attn.o_proj", (4, 16), False),  # GQA 4/2
    "cohere": ("model.layers", "self_attn.o_proj", "mlp.down_proj", "self_attn.o_proj", (4, 16), True),  # parallel
    "codegen": ("transformer.h", "attn.out_proj", "mlp.fc_out", "attn.out_proj", (4, 16), True),  # GPT-J-like
    "olmoe": ("model.layers", "self_attn.o_proj", "mlp", "self_attn.o_proj", (4, 16), False),  # MoE
    "olmo3": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj", (4, 16),
              False),  # post-norm
    "persimmon": ("model.layers", "self_attn.dense", "mlp.dense_4h_to_h", "self_attn.dense", (4, 16), False),
}
# table families whose MLP reads the block input (GPT-NeoX's use_parallel_residual and Falcon's
# parallel_attn default to True in transformers 5.x)
PARALLEL = {"gptj", "gpt_neox", "falcon"}


def _steering_equals_hooks(model: torch.nn.Module, model_type: str,
                           cases: dict[str, tuple[str, str, int]]) -> None:
    """Steering each site (``site -> (module path, side, width)``) equals the hand-written hook there bit for bit
    and changes the logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    for site, (path, side, width) in cases.items():
        v = torch.randn(width, generator=g)
        with iv.Intervenable(model, iv.Steering({site: v}, scale=1.5)) as ivm, torch.no_grad():
            got = ivm(input_ids=IDS).logits
        assert torch.equal(got, hooked_logits(model, path, side, 1.5 * v)), f"{model_type} {site}"
        assert not torch.equal(got, base), f"{model_type} {site}: no effect"


@pytest.mark.parametrize("model_type", sorted(DISCOVERED))
def test_discovered_structure(model_type: str) -> None:
    model = build(model_type)
    assert model.config.model_type not in FAMILIES
    layers, attn, mlp, proj, heads, parallel = DISCOVERED[model_type]
    assert resolve_site(model, "layers.1").module_path == f"{layers}.1"
    assert resolve_site(model, "layers.1.attn").module_path == f"{layers}.1.{attn}"
    assert resolve_site(model, "layers.1.mlp").module_path == f"{layers}.1.{mlp}"
    h = resolve_site(model, "layers.1.heads")
    assert (h.module_path, h.side, h.heads) == (f"{layers}.1.{proj}", "input", heads)
    assert layer_parts(model, 1).parallel is parallel
    if model_type == "smollm3":
        assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4


def _family_of_tiny(name: str) -> str:
    return CONFIGS[name][0].model_type


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_discovery_reproduces_the_table(name: str) -> None:
    """Every table family, rediscovered by the probe, names the same modules and head view."""
    model = tiny_model(name)
    fam = FAMILIES[_family_of_tiny(name)]
    found = discover(model)
    assert found.layers == fam.layers
    for i, p in enumerate(found.parts):
        assert not {"block", "attn", "mlp", "heads"} & set(p.missing), p.missing
        assert (p.attn, p.mlp, p.attn_proj) == (fam.attn_writer or fam.attn_out, fam.mlp_writer or fam.mlp_out,
                                                  fam.attn_out)
        assert p.heads == resolve_site(model, f"layers.{i}.heads").heads
        assert p.parallel is (name in PARALLEL)


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2"])
def test_post_norm_table_families_rediscovered(model_type: str) -> None:
    model = build(model_type)
    p = discover(model).parts[1]
    assert (p.attn, p.mlp, p.attn_proj, p.mlp_proj) == ("post_attention_layernorm", "post_feedforward_layernorm",
                                                        "self_attn.o_proj", "mlp.down_proj")




@pytest.mark.parametrize("model_type", sorted(DISCOVERED))
def test_steering_through_discovery_is_exact(model_type: str) -> None:
    model = build(model_type)
    layers, attn, mlp, proj, heads, _ = DISCOVERED[model_type]
    cases = {"layers.1": (f"{layers}.1", "output", 64), "layers.1:input": (f"{layers}.1", "input", 64),
             "layers.1.attn": (f"{layers}.1.{attn}", "output", 64), "layers.1.mlp": (f"{layers}.1.{mlp}", "output", 64),
             "layers.1.heads": (f"{layers}.1.{proj}", "input", heads[0] * heads[1])}
    _steering_equals_hooks(model, model_type, cases)


@pytest.mark.parametrize("model_type", ["smollm3", "cohere", "olmo3"])
def test_block_output_is_input_plus_writers(model_type: str) -> None:
    """Independent of the resolver: out - in == attn + mlp at the hand-written paths (pre-norm and
    parallel), or == post-norms' outputs (post-norm)."""
    model = build(model_type)
    layers, attn, mlp, *_ = DISCOVERED[model_type]
    got: dict[str, torch.Tensor] = {}

    def keep(key: str, first_input: bool = False):
        def fn(m, args, *rest):
            t = (rest[0].get("hidden_states", args[0] if args else None)) if first_input else rest[0]
            got.setdefault(key, t.clone())
        return fn

    block = model.get_submodule(f"{layers}.1")
    hs = [block.register_forward_pre_hook(keep("in", True), with_kwargs=True),
          block.register_forward_hook(keep("out")),
          block.get_submodule(attn).register_forward_hook(keep("a")),
          block.get_submodule(mlp).register_forward_hook(keep("m"))]
    with torch.no_grad():
        model(input_ids=IDS)
    for h in hs:
        h.remove()
    assert torch.allclose(got["out"], got["in"] + got["a"] + got["m"], atol=1e-5)


def test_residual_multipliers_are_recorded_gains() -> None:
    model = build("minicpm3")  # out = x + (1.4 / sqrt(2)) * (attn + mlp); embeddings times scale_emb = 12
    p = layer_parts(model, 1)
    assert p.attn_gain == pytest.approx(1.4 / 2 ** 0.5, rel=1e-6) and p.mlp_gain == pytest.approx(1.4 / 2 ** 0.5,
                                                                                                rel=1e-6)
    assert discover(model).embed_gain == pytest.approx(12.0, rel=1e-6)


def _bake_delta(model: torch.nn.Module, steer: iv.Steering, tmp_path) -> tuple[float, float]:
    ivm = iv.Intervenable(model, steer, attach=False)
    with torch.no_grad():
        hooked = ivm(input_ids=IDS).logits
        base = model(input_ids=IDS).logits
        ivm.bake().save_pretrained(tmp_path)
        baked = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()(input_ids=IDS).logits
    return float((baked - hooked).abs().max()), float((hooked - base).abs().max())


def _vec(model: torch.nn.Module, site: str, seed: int) -> torch.Tensor:
    s = resolve_site(model, site)
    return torch.randn(s.heads[0] * s.heads[1] if s.heads else s.width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("model_type", "sites"), [
    ("cohere", ["layers.1", "layers.0.attn", "layers.1.mlp", "layers.1.heads", "layers.0:input"]),  # parallel
    ("codegen", ["layers.1", "layers.1.heads", "layers.0:input"]),  # parallel, biases only on the MLP
    ("smollm3", ["layers.1", "layers.0.attn", "layers.1.heads", "layers.0:input"]),  # GQA, mlp_bias flag
    ("olmo3", ["layers.1.heads", "layers.0:input"]),  # post-norm: ITI bakes into o_proj via attention_bias
    ("gemma2", ["layers.1.heads", "layers.0:input"]),  # table family, layout from discovery; sqrt(hidden) embed
    ("gemma3", ["layers.1.heads", "layers.0:input"]),  # multimodal wrapper: text_config.attention_bias
    ("olmoe", ["layers.0.attn", "layers.1.heads"]),  # MoE: attention side only
    ("minicpm3", ["layers.1", "layers.1.heads", "layers.0:input"]),  # residual multipliers and scale_emb
])
def test_bake_through_discovery_is_exact(model_type: str, sites: list[str], tmp_path) -> None:
    model = build(model_type)
    steer = iv.Steering({s: _vec(model, s, i) for i, s in enumerate(sites)}, scale=2.0)
    delta, effect = _bake_delta(model, steer, tmp_path)
    assert effect > 1e-2 and delta < 1e-4, f"{model_type}: baked differs from hooked by {delta:.2e}"


@pytest.mark.parametrize(("model_type", "site", "why"), [
    ("olmo3", "layers.1", "post-norm"),
    ("olmo3", "layers.0.attn", "post-norm"),
    ("olmoe", "layers.1.mlp", "OlmoeConfig has no flag"),
    ("stablelm", "layers.1.heads", "StableLmConfig has no flag"),
    ("openai-gpt", "layers.1", "post-LN"),
])
def test_bake_refusals_name_the_reason(model_type: str, site: str, why: str) -> None:
    model = build(model_type)
    with pytest.raises(iv.NotBakeableError, match=why):
        iv.Intervenable(model, iv.Steering({site: _vec(model, site, 0)}), attach=False).bake()


@pytest.mark.parametrize(("model_type", "site", "why"), [
    ("zamba", "layers.1.mlp", "reach the residual only through it"),  # the shared transformer feeds Mamba
    ("jetmoe", "layers.1.heads", "is not a Linear layer"),
    ("granitemoehybrid", "layers.1.mlp", "split across block_sparse_moe, shared_mlp"),
    ("longcat_flash", "layers.1.attn", "token mixers after per-position ones"),  # two attention + MLP pairs
    # reversible: the feed-forward reads attention's output, not the residual, so it moves with the residual
    # held although it acts per position: not called attention (nor MLP) on that evidence
    ("reformer", "layers.1.attn", "could not tell whether feed_forward.output.dense mixes tokens"),
])
def test_unresolved_parts_raise_site_error_naming_why(model_type: str, site: str, why: str) -> None:
    model = build(model_type)
    resolve_site(model, "layers.1")  # the block itself still resolves
    with pytest.raises(iv.SiteError, match=why):
        resolve_site(model, site)
    assert site not in site_names(model) and "layers.1" in site_names(model)


@pytest.mark.parametrize(("model_type", "why"), [
    ("hy_v4", "several residual streams"),  # hyper-connections
    ("hrm_text", "looped stack"),
])
def test_unsupported_structures_raise_naming_why(model_type: str, why: str) -> None:
    with pytest.raises(iv.UnsupportedModelError, match=why):
        resolve_site(build(model_type), "layers.0")


@pytest.mark.parametrize("model_type", ["cohere", "falcon_h1", "mamba"])  # two writers; a chain; one writer
def test_probe_leaves_the_model_as_it_was(model_type: str) -> None:
    model = build(model_type).train()  # dropout on: the probe must switch it off and back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    discover(model)
    assert model.training and all(m.training for m in model.modules())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nested_bias_flag_is_set_on_the_text_config() -> None:
    model = build("gemma3")
    steer = iv.Steering({"layers.1.heads": _vec(model, "layers.1.heads", 0)})
    baked, report = bake_with_report(model, [steer])
    assert report.config_flags == {"text_config.attention_bias": True}
    assert baked.config.text_config.attention_bias is True and model.config.text_config.attention_bias is False


def test_table_family_with_residual_multipliers_bakes_with_measured_gains(tmp_path) -> None:
    """Granite is in the site table (o_proj / down_proj) but scales both branches and the embeddings;
    its bake layout comes from discovery, so the measured gains are used."""
    cfg = T.GraniteConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, residual_multiplier=0.25,
                          embedding_multiplier=3.0, attention_multiplier=0.5)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    assert layer_parts(model, 1).mlp_gain == 1.0  # the table knows nothing of the multiplier
    assert discover(model).parts[1].mlp_gain == pytest.approx(0.25, rel=1e-6)
    sites = ["layers.1", "layers.0.attn", "layers.1.heads", "layers.0:input"]
    steer = iv.Steering({s: _vec(model, s, i) for i, s in enumerate(sites)}, scale=2.0)
    delta, effect = _bake_delta(model, steer, tmp_path)
    assert effect > 1e-2 and delta < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_type", ["smollm3", "cohere", "olmo3", "minicpm3"])
def test_half_precision_discovers_the_same_structure(model_type: str, dtype: torch.dtype) -> None:
    """A bf16 sum cannot tell a writer from rounding, so each block is re-run alone in float32; the
    model's own weights come back untouched (same tensors, same bits)."""
    ref = discover(build(model_type))
    model = build(model_type).to(dtype)
    before = {n: (p.data_ptr(), p.clone()) for n, p in model.named_parameters()}
    found = discover(model)
    for a, b in zip(found.parts, ref.parts):
        assert (a.attn, a.mlp, a.attn_proj, a.heads, a.parallel) == (b.attn, b.mlp, b.attn_proj, b.heads, b.parallel)
        assert a.mlp_gain == pytest.approx(b.mlp_gain, rel=1e-4)
    assert found.embed_gain == pytest.approx(ref.embed_gain, rel=1e-3)
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]) for n, p in model.named_parameters())


def test_bare_base_model_of_a_discovered_family() -> None:
    base = build("cohere").model  # CohereModel: no LM head, output is the last hidden state
    assert resolve_site(base, "layers.1.mlp").module_path == "layers.1.mlp.down_proj"
    assert resolve_site(base, "layers.1.heads").heads == (4, 16)
    assert layer_parts(base, 1).parallel is True


@pytest.mark.parametrize("model_type", ["cohere", "minicpm3", "gemma2"])
def test_bake_through_discovery_in_bf16(model_type: str) -> None:
    model = build(model_type).to(torch.bfloat16)
    sites = {"cohere": ["layers.1", "layers.0.attn", "layers.1.heads", "layers.0:input"],
             "minicpm3": ["layers.1", "layers.1.heads", "layers.0:input"],
             "gemma2": ["layers.1.heads", "layers.0:input"]}[model_type]
    steer = iv.Steering({s: _vec(model, s, i) for i, s in enumerate(sites)}, scale=2.0)
    ivm = iv.Intervenable(model, steer, attach=False)
    baked = ivm.bake()
    assert {p.dtype for p in baked.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        hooked, got, base = ivm(input_ids=IDS).logits, baked(input_ids=IDS).logits, model(input_ids=IDS).logits
    assert float((got.float() - hooked.float()).abs().max()) < 0.1 * float((hooked.float() - base.float()).abs().max())


# ---- blocks followed step by step (intervene/sites/chain.py) --------------------------------------
# (model_type, block, blocks, attn writer, mlp writer, heads module, heads, extra writers, absent parts); paths
# hand-read from each family's decoder layer in transformers 5.25
CHAINED = [
    ("beam", 1, "model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj", (4, 16),
     (), set()),  # depth-scaled residual: r * sqrt((k-1)/k) + branch / sqrt(k)
    ("doge", 1, "model.layers", "self_attn.o_proj", "mlp.down_proj", "self_attn.o_proj", (4, 16), (), set()),
    ("ergo", 1, "model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj", (4, 16),
     (), set()),  # learned per-channel gates on branch and residual
    ("zaya", 1, "model.layers", "self_attn.o_proj", "mlp", "self_attn.o_proj", (4, 16), (), set()),  # scales + biases
    ("gpt_neox_japanese", 1, "gpt_neox_japanese.layers", "attention.dense", "mlp.dense_4h_to_h", "attention.dense",
     (4, 16), (), set()),  # the last layer adds the attention bias outside the attention module
    ("minimax", 1, "model.layers", "self_attn.out_proj", "mlp", "self_attn.out_proj", (4, 16), (), set()),  # normed
    ("falcon_h1", 1, "model.layers", "self_attn.o_proj", "feed_forward.down_proj", "self_attn.o_proj", (4, 16),
     ("mamba.out_proj",), set()),  # Mamba beside attention
    ("gemma4_text", 1, "model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj",
     (4, 16), ("post_per_layer_input_norm",), set()),  # the per-layer-input branch after the MLP
    ("rwkv", 0, "rwkv.blocks", "attention.output", "feed_forward", None, None, (), {"heads"}),  # pre_ln in block 0
    ("mamba", 1, "backbone.layers", "mixer.out_proj", None, None, None, (), {"mlp", "heads"}),
    ("mamba2", 1, "backbone.layers", "mixer.out_proj", None, "mixer.out_proj", (8, 16), (), {"mlp"}),
    ("nemotron_h", 0, "model.layers", "mixer.out_proj", None, "mixer.out_proj", (4, 16), (), {"mlp"}),  # Mamba-2
    ("nemotron_h", 1, "model.layers", None, "mixer", None, None, (), {"attn", "heads"}),  # MoE only
    ("nemotron_h", 2, "model.layers", "mixer.o_proj", None, "mixer.o_proj", (4, 16), (), {"mlp"}),  # attention only
]
_IDS = [f"{c[0]}-{c[1]}" for c in CHAINED]


@pytest.mark.parametrize("case", CHAINED, ids=_IDS)
def test_chained_structure(case: tuple) -> None:
    model_type, i, layers, attn, mlp, proj, heads, extra, absent = case
    model = build(model_type)
    assert model.config.model_type not in FAMILIES
    p = layer_parts(model, i)
    assert (p.attn, p.mlp, p.extra, set(p.absent)) == (attn, mlp, extra, absent)
    for kind, rel in (("attn", attn), ("mlp", mlp)):
        if rel is not None:
            assert resolve_site(model, f"layers.{i}.{kind}").module_path == f"{layers}.{i}.{rel}"
    if heads is not None:
        h = resolve_site(model, f"layers.{i}.heads")
        assert (h.module_path, h.side, h.heads) == (f"{layers}.{i}.{proj}", "input", heads)
    for kind in absent:  # a part the block does not have: a SiteError that says so, and no such name
        with pytest.raises(iv.SiteError, match="does not exist"):
            resolve_site(model, f"layers.{i}.{kind}")
        assert f"layers.{i}.{kind}" not in site_names(model)


@pytest.mark.parametrize("case", CHAINED, ids=_IDS)
def test_steering_through_chains_is_exact(case: tuple) -> None:
    model_type, i, layers, attn, mlp, proj, heads, *_ = case
    model = build(model_type)
    cases = {f"layers.{i}": (f"{layers}.{i}", "output", 64), f"layers.{i}:input": (f"{layers}.{i}", "input", 64)}
    if attn is not None:
        cases[f"layers.{i}.attn"] = (f"{layers}.{i}.{attn}", "output", 64)
    if mlp is not None:
        cases[f"layers.{i}.mlp"] = (f"{layers}.{i}.{mlp}", "output", 64)
    if heads is not None:
        cases[f"layers.{i}.heads"] = (f"{layers}.{i}.{proj}", "input", heads[0] * heads[1])
    _steering_equals_hooks(model, model_type, cases)


def _steps(model: torch.nn.Module, i: int) -> list[tuple]:
    return [(s.target, s.base, s.writers) for s in layer_parts(model, i).steps]


def _close(got: float | tuple[float, ...] | None, want: torch.Tensor | float) -> bool:
    return got is not None and torch.allclose(torch.as_tensor(got, dtype=torch.float64),
                                              torch.as_tensor(want, dtype=torch.float64).expand(64), rtol=1e-5,
                                              atol=1e-6)


def test_depth_scaled_residual_gains_are_the_sources() -> None:
    """Beam, block 1 (its adds are the 4th and 5th): r * sqrt((k-1)/k) + branch / sqrt(k)."""
    s1, s2 = layer_parts(build("beam"), 1).steps
    assert _close(s1.resid, (3 / 4) ** 0.5) and _close(s1.gains[0], 1 / 4 ** 0.5)
    assert _close(s2.resid, (4 / 5) ** 0.5) and _close(s2.gains[0], 1 / 5 ** 0.5)


def test_per_channel_residual_gains_are_the_parameters() -> None:
    model = build("doge")  # residual * input_residual + attn; then * post_attention_residual + mlp
    block = model.model.layers[1]
    s1, s2 = layer_parts(model, 1).steps
    assert _close(s1.resid, block.input_residual.detach()) and s1.gains == (1.0,)
    assert _close(s2.resid, block.post_attention_residual.detach()) and s2.gains == (1.0,)
    w = build("ergo").model.layers[1].attention_residual_gate.weight.detach().double()  # ErgoResidualGate
    s1 = layer_parts(build("ergo"), 1).steps[0]
    assert _close(s1.gains[0], w.sigmoid())
    assert _close(s1.resid, (1 + w.sigmoid()).sqrt() * torch.exp(-0.5 * torch.nn.functional.softplus(w)))


def test_residual_scaling_with_biases_is_gains_and_offset() -> None:
    model = build("zaya")  # ZayaResidualScaling: (branch + b_h) * s_h + (residual + b_r) * s_r
    sc = model.model.layers[1].post_attention_residual_scale
    s_h, b_h, s_r, b_r = (t.detach().double() for t in (sc.hidden_states_scale, sc.hidden_states_bias,
                                                       sc.residual_scale, sc.residual_bias))
    s1 = layer_parts(model, 1).steps[0]
    assert _close(s1.gains[0], s_h) and _close(s1.resid, s_r) and _close(s1.offset, b_h * s_h + b_r * s_r)
    p = layer_parts(model, 1)
    assert p.offset and p.resid_gain is not None and not isinstance(p.resid_gain, float)


def test_bias_added_outside_the_attention_is_an_offset() -> None:
    model = build("gpt_neox_japanese")  # only the last layer's attention has dense_bias, added by the block
    s1, s2 = layer_parts(model, 1).steps
    assert _close(s1.offset, model.gpt_neox_japanese.layers[1].attention.dense_bias.detach())
    assert (s1.gains, s1.resid, s2.offset) == ((1.0,), 1.0, None)
    assert not layer_parts(model, 0).offset and layer_parts(model, 0).steps == ()  # plain: the two-writer check


def test_residual_normalised_before_the_add() -> None:
    """MiniMax: h = a_attn * N1(x) + b_attn * attn; out = a_mlp * N2(h) + b_mlp * mlp."""
    model = build("minimax", linear_attn_alpha_factor=0.7, linear_attn_beta_factor=1.3, mlp_alpha_factor=0.6,
                  mlp_beta_factor=1.5)
    assert _steps(model, 1) == [("post_attention_layernorm:input", "input_layernorm:output", ("self_attn.out_proj",)),
                                ("output", "post_attention_layernorm:output", ("mlp",))]
    s1, s2 = layer_parts(model, 1).steps
    assert _close(s1.resid, 0.7) and _close(s1.gains[0], 1.3) and _close(s2.resid, 0.6) and _close(s2.gains[0], 1.5)
    p = layer_parts(model, 1)
    assert p.normed and p.resid_gain is None and _close(p.mlp_gain, 1.5)


def test_mamba_beside_attention_is_an_extra_writer() -> None:
    """Falcon-H1: x + ssm_out * mamba(N(x)) + attn_out * attn(N(x)), then + MLP; both mix tokens, only the
    attention computes a softmax over keys, so it is .attn."""
    model = build("falcon_h1", ssm_out_multiplier=0.5, attention_out_multiplier=1.75)
    assert _steps(model, 1) == [("pre_ff_layernorm:input", "input", ("mamba.out_proj", "self_attn.o_proj")),
                                ("output", "pre_ff_layernorm:input", ("feed_forward.down_proj",))]
    p = layer_parts(model, 1)
    assert _close(p.steps[0].gains[0], 0.5) and _close(p.attn_gain, 1.75) and p.mlp_gain == 1.0
    assert p.parallel is False and p.mlp_last


@pytest.mark.parametrize(("model_type", "why"), [
    ("zamba", "reach the residual only through it"),  # Zamba has attention and an MLP; they feed Mamba
    ("granitemoehybrid", "split across"),
])
def test_unresolved_is_not_absent(model_type: str, why: str) -> None:
    p = layer_parts(build(model_type), 1)
    assert "mlp" not in p.absent and why in p.missing["mlp"]
    with pytest.raises(iv.SiteError, match="does not resolve"):
        resolve_site(build(model_type), "layers.1.mlp")


@pytest.mark.parametrize(("model_type", "attn", "heads_elsewhere"), [
    # a chain block (one writer); Zamba's attention runs in the shared transformer, which only feeds the
    # Mamba mixer, so no block has a heads view of its own
    ("zamba", "mamba.out_proj", False),
    ("jamba", "mamba.out_proj", True),  # a two-writer block: Mamba-1 mixer + MLP
    ("recurrent_gemma", "temporal_block.linear_out", True),  # the RG-LRU recurrent block
])
def test_config_attention_heads_do_not_apply_to_a_non_attention_mixer(model_type: str, attn: str,
                                                                      heads_elsewhere: bool) -> None:
    """Block 0's token mixer declares no heads and computes no attention while attention runs elsewhere in
    the model: the config's head count is attention's, so no heads view (it used to be the config's, a guess)."""
    model = build(model_type)
    p = layer_parts(model, 0)
    assert p.attn == attn and p.heads is None and "attention's" in p.missing["heads"]
    assert "heads" not in p.absent  # the model has attention heads, only not in this branch
    assert any(layer_parts(model, i).heads for i in range(1, num_layers(model))) == heads_elsewhere


@pytest.mark.parametrize(("model_type", "sites", "why"), [
    ("doge", ["layers.*:input", "layers.*.attn", "layers.*"], "scales its residual per channel"),
    ("falcon_h1", ["layers.*:input", "layers.*.attn", "layers.*"], "adds mamba.out_proj besides"),
    ("mamba", ["layers.*:input", "layers.*.attn", "layers.*"], "has no attention and MLP writer pair"),
])
def test_residual_ablation_refuses_where_writers_do_not_span_the_residual(model_type: str, sites: list[str],
                                                                          why: str) -> None:
    model = build(model_type)
    abl = iv.DirectionalAblation(_vec(model, "layers.0", 7), sites=sites)
    with pytest.raises(iv.NotBakeableError, match=why):
        iv.Intervenable(model, abl, attach=False).bake()


def test_constant_after_a_block_with_a_writer_after_the_mlp_refuses() -> None:
    model = build("gemma4_text")
    with pytest.raises(iv.NotBakeableError, match="after its MLP"):
        iv.Intervenable(model, iv.Steering({"layers.1": _vec(model, "layers.1", 0)}), attach=False).bake()


@pytest.mark.parametrize(("model_type", "sites"), [
    ("doge", ["layers.1", "layers.0.attn", "layers.1.mlp", "layers.1.heads"]),  # per-channel residual gains
    ("falcon_h1", ["layers.1", "layers.0.attn", "layers.1.heads"]),  # a third writer before the MLP
    ("mamba", ["layers.1", "layers.0.attn", "layers.0:input"]),  # one writer: the constant goes to the mixer
])
def test_bake_through_chains_is_exact(model_type: str, sites: list[str], tmp_path) -> None:
    model = build(model_type)
    steer = iv.Steering({s: _vec(model, s, i) for i, s in enumerate(sites)}, scale=2.0)
    delta, effect = _bake_delta(model, steer, tmp_path)
    assert effect > 1e-2 and delta < 1e-4, f"{model_type}: baked differs from hooked by {delta:.2e}"


def test_residual_rescaled_between_blocks() -> None:
    """RWKV halves the residual every rescale_every blocks in eval mode (every block in this build):
    layers.0 and layers.1:input are then different points, both steered exactly; a constant at
    layers.1:input is not one of block 0's writers' biases, so it does not bake."""
    model = build("rwkv")
    assert discover(model).between == (0.5,)
    g = torch.Generator().manual_seed(0)
    points = {"layers.0": ("rwkv.blocks.0", "output"), "layers.1:input": ("rwkv.blocks.1", "input")}
    for site, (path, side) in points.items():
        v = torch.randn(64, generator=g)
        with iv.Intervenable(model, iv.Steering({site: v})) as ivm, torch.no_grad():
            got = ivm(input_ids=IDS).logits
        assert torch.equal(got, hooked_logits(model, path, side, v)), site
    with pytest.raises(iv.NotBakeableError, match="multiplies the residual by 0.5 between blocks 0 and 1"):
        iv.Intervenable(model, iv.Steering({"layers.1:input": torch.randn(64)}), attach=False).bake()
