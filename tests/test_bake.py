"""Baking: save_pretrained + vanilla from_pretrained of the baked model reproduces the hooked logits.

Per family, every steering site kind that bakes is applied at once; kinds a family cannot express
as weights must refuse with a reason that names the family's config and the missing flag.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import intervene as iv
from intervene.bake import bake_with_report
from intervene.hooks import count_hooks
from intervene.intervention import Intervention
from intervene.registry import register, register_method
from intervene.sites import hidden_size, resolve_site
from tests.tiny_models import tiny_model

ALL = {"block", "input", "attn", "mlp", "heads", "embed"}
# Which steering site kinds bake exactly on each tiny family (transformers 5.x configs).
BAKES: dict[str, set[str]] = {
    "llama": ALL, "llama_gqa": ALL, "gpt2": ALL, "gpt_neox": ALL, "gptj": ALL, "opt": ALL, "falcon": ALL,
    "bloom": ALL - {"embed"},
    "gemma": {"attn", "heads", "embed"},
    "mistral": {"embed"}, "qwen2": {"embed"}, "phi3": {"embed"}, "mixtral": {"embed"},
}
# What a refusal must mention (the config class and the flag it lacks, or the module in the way).
WHY = {"mistral": "MistralConfig", "qwen2": "Qwen2Config", "phi3": "Phi3Config", "gemma": "GemmaConfig",
       "mixtral": "MixtralConfig", "bloom": "word_embeddings_layernorm"}
SITES = {"block": "layers.1", "input": "layers.1:input", "attn": "layers.0.attn", "mlp": "layers.1.mlp",
         "heads": "layers.1.heads", "embed": "layers.0:input"}
ABLATION = ["layers.*:input", "layers.*.attn", "layers.*"]  # pre / mid / post at every layer
TOL = 1e-4


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 12, 13, 14, 15]])
    am = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": am}


def _vec(model, site: str, seed: int) -> torch.Tensor:
    s = resolve_site(model, site)
    width = s.heads[0] * s.heads[1] if s.heads else hidden_size(model)
    return torch.randn(width, generator=torch.Generator().manual_seed(seed))


def _compare(model, interventions, tmp_path) -> tuple[float, float]:
    """(max |baked - hooked|, max |hooked - base|) over real tokens; the baked model goes through
    save_pretrained and a vanilla AutoModelForCausalLM.from_pretrained."""
    batch = _batch()
    ivm = iv.Intervenable(model, interventions, attach=False)
    with torch.no_grad():
        hooked = ivm(**batch).logits
        base = model(**batch).logits
        ivm.bake().save_pretrained(tmp_path)
        reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        baked = reloaded(**batch).logits
    real = batch["attention_mask"].bool()
    return float((baked - hooked)[real].abs().max()), float((hooked - base)[real].abs().max())


@pytest.mark.parametrize("family", sorted(BAKES))  # families whose bake coverage is recorded above
def test_steering_bakes_exactly(family, tmp_path):
    model = tiny_model(family)
    kinds = sorted(BAKES[family])
    steer = iv.Steering({SITES[k]: _vec(model, SITES[k], i) for i, k in enumerate(kinds)}, scale=2.0)
    delta, effect = _compare(model, [steer], tmp_path)
    assert effect > 1e-2, "the edit must be visible"
    assert delta < TOL, f"{family}: baked logits differ from hooked by {delta:.2e}"


@pytest.mark.parametrize("family", [f for f in sorted(BAKES) if BAKES[f] != ALL])
def test_steering_refusals_name_the_config(family):
    model = tiny_model(family)
    for kind in sorted(ALL - BAKES[family]):
        ivm = iv.Intervenable(model, iv.Steering({SITES[kind]: _vec(model, SITES[kind], 0)}), attach=False)
        with pytest.raises(iv.NotBakeableError, match=WHY[family]) as err:
            ivm.bake()
        assert SITES[kind] in str(err.value)


@pytest.mark.parametrize("family", sorted(BAKES))
def test_residual_ablation_bakes_exactly(family, tmp_path):
    model = tiny_model(family)
    abl = iv.DirectionalAblation(_vec(model, "layers.0", 7), sites=ABLATION)
    if family == "bloom":
        with pytest.raises(iv.NotBakeableError, match="word_embeddings_layernorm"):
            iv.Intervenable(model, abl, attach=False).bake()
        return
    delta, effect = _compare(model, [abl], tmp_path)
    assert effect > 1e-2
    assert delta < TOL, f"{family}: baked ablation differs from hooked by {delta:.2e}"


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_writer_edits_compose_in_hook_order(family, tmp_path):
    """Input and output edits of the same module, in both orders, fold like the hooks compose."""
    model = tiny_model(family)
    d, r = _vec(model, "layers.1.heads", 1), _vec(model, "layers.1", 2)
    a = iv.DirectionalAblation(d, sites="layers.1.heads", value=0.5, name="a")
    s = iv.Steering({"layers.1.heads": _vec(model, "layers.1.heads", 3)}, name="s")
    b = iv.DirectionalAblation(r, sites=["layers.1.attn", "layers.0.mlp"], value=-1.0, name="b")
    t = iv.Steering({"layers.1.attn": _vec(model, "layers.1", 4)}, name="t")
    for i, order in enumerate(([s, a, t, b], [b, a, s, t])):
        delta, effect = _compare(model, order, tmp_path / str(i))
        assert effect > 1e-2 and delta < TOL


def test_writer_ablation_alone_is_local(tmp_path):
    model = tiny_model("mistral")  # no biases anywhere: projections need none
    abl = iv.DirectionalAblation(_vec(model, "layers.0", 5), sites=["layers.0.mlp", "layers.1.attn"])
    delta, effect = _compare(model, [abl], tmp_path)
    assert effect > 1e-3 and delta < TOL


def test_raw_module_path_bakes_like_the_canonical_site(tmp_path):
    model = tiny_model("llama")
    v = _vec(model, "layers.1", 0)
    delta, effect = _compare(model, [iv.Steering({"model.layers.1.mlp.down_proj": v})], tmp_path)
    assert effect > 1e-2 and delta < TOL
    ivm = iv.Intervenable(model, iv.Steering({"model.layers.1.mlp.act_fn": torch.zeros(64)}), attach=False)
    with pytest.raises(iv.NotBakeableError, match="not a residual-stream point"):
        ivm.bake()


def test_refusals_come_before_any_copy(monkeypatch):
    import intervene.bake as bake_mod

    def no_copy(model):
        raise AssertionError("the model was copied before the refusal")

    monkeypatch.setattr(bake_mod, "clean_copy", no_copy)
    for family, site in [("mistral", "layers.1"), ("gptj", "layers.1:input"), ("bloom", "layers.0:input")]:
        model = tiny_model(family)
        steer = iv.Steering({site: _vec(model, site, 0)}, positions="all" if family != "gptj" else "prompt")
        with pytest.raises(iv.NotBakeableError):
            iv.Intervenable(model, steer, attach=False).bake()


def test_refusals():
    model = tiny_model("llama")
    v = _vec(model, "layers.1", 0)
    cases = [
        (iv.Steering({"layers.1": v}, positions="generated"), "positions='generated'"),
        (iv.Steering({"layers.1": v}, positions=[0, 2]), "only positions='all' bakes"),
        (iv.DirectionalAblation(v, sites="layers.*"), "input of block 0"),
        (iv.DirectionalAblation(v, sites=ABLATION, value=1.0), "clamping"),
    ]
    for intervention, why in cases:
        with pytest.raises(iv.NotBakeableError, match=why):
            iv.Intervenable(model, intervention, attach=False).bake()
    both = [iv.DirectionalAblation(v, sites=ABLATION), iv.Steering({"layers.1": v})]
    with pytest.raises(iv.NotBakeableError, match="on its own"):
        iv.Intervenable(model, both, attach=False).bake()


@register("test_input_dependent")
class _InputDependent(Intervention):
    def apply(self, site, h, ctx):
        return h * 2


def test_unknown_types_refuse_and_registry_extends():
    model = tiny_model("llama")
    ivm = iv.Intervenable(model, _InputDependent("layers.1"), attach=False)
    with pytest.raises(iv.NotBakeableError, match="no baker is registered for this type"):
        ivm.bake()
    register_method("test_input_dependent", _InputDependent, refuse="doubling is input-dependent")
    with pytest.raises(iv.NotBakeableError, match="doubling"):
        ivm.bake()


def test_original_untouched_and_baked_is_plain(tmp_path):
    model = tiny_model("gpt2")  # tied embeddings: the embedding edit must untie a copy only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = count_hooks(model)
    steer = iv.Steering({"layers.0:input": _vec(model, "layers.0", 0), "layers.1": _vec(model, "layers.1", 1)})
    with iv.Intervenable(model, steer) as ivm:
        attached_hooks = count_hooks(model)
        baked, report = bake_with_report(ivm.model, ivm.interventions)
        assert count_hooks(model) == attached_hooks and "generate" in model.__dict__
    assert count_hooks(model) == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.transformer.wte.weight and model.config.tie_word_embeddings
    assert count_hooks(baked) == 0 and "generate" not in baked.__dict__
    assert report.untied_embeddings and baked.lm_head.weight is not baked.transformer.wte.weight
    assert "transformer.wte.weight" in report.edited


def test_zero_edit_is_bit_identical():
    model = tiny_model("llama")
    ivm = iv.Intervenable(model, iv.Steering({"layers.1": torch.zeros(32), "layers.0.heads": torch.ones(32)},
                                             scale=0.0), attach=False)
    baked, report = bake_with_report(ivm.model, ivm.interventions)
    assert not report.edited and not report.config_flags
    with torch.no_grad():
        assert torch.equal(baked(**_batch()).logits, model(**_batch()).logits)


def test_dtype_kept_and_nonfinite_refused():
    model = tiny_model("llama", torch.bfloat16)
    v = _vec(model, "layers.1", 0)
    baked, report = bake_with_report(model, [iv.Steering({"layers.1": v})])
    assert {p.dtype for p in baked.parameters()} == {torch.bfloat16}
    assert "model.layers.1.mlp.down_proj.bias" in report.created and report.config_flags == {"mlp_bias": True}
    with torch.no_grad():
        hooked = iv.Intervenable(model, iv.Steering({"layers.1": v}), attach=False)(**_batch()).logits
        real = _batch()["attention_mask"].bool()
        assert (baked(**_batch()).logits.float() - hooked.float())[real].abs().max() < 0.05
    huge = iv.Intervenable(tiny_model("llama", torch.float16), iv.Steering({"layers.1": v}, scale=1e6), attach=False)
    with pytest.raises(iv.NotBakeableError, match="non-finite"):
        huge.bake()


def test_baked_generation_matches_hooked():
    model = tiny_model("llama")
    steer = iv.Steering({"layers.1": _vec(model, "layers.1", 0), "layers.0.heads": _vec(model, "layers.0.heads", 1)},
                        scale=3.0)
    ivm = iv.Intervenable(model, steer, attach=False)
    baked = ivm.bake()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ivm.generate(**_batch(), **kw), baked.generate(**_batch(), **kw))


def test_cli_bake(tmp_path, capsys):
    from intervene.cli import main

    model = tiny_model("gpt_neox")
    model.save_pretrained(tmp_path / "base")
    v = _vec(model, "layers.1", 0)
    ivm = iv.Intervenable(model, iv.Steering({"layers.1": v, "layers.0.heads": _vec(model, "layers.0.heads", 1)}),
                          attach=False)
    ivm.save_pretrained(tmp_path / "diff")
    assert main(["bake", str(tmp_path / "base"), str(tmp_path / "diff"), "--out", str(tmp_path / "out")]) == 0
    assert "baked 1 intervention(s)" in capsys.readouterr().out
    assert "library_name: intervene" in (tmp_path / "out" / "README.md").read_text()
    baked = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    real = _batch()["attention_mask"].bool()
    with torch.no_grad():
        assert (baked(**_batch()).logits - ivm(**_batch()).logits)[real].abs().max() < TOL

    iv.Intervenable(model, iv.Steering({"layers.1": v}, positions="last"), attach=False).save_pretrained(tmp_path / "d2")
    assert main(["bake", str(tmp_path / "base"), str(tmp_path / "d2"), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the model-loading bar, one line says why
    assert last.startswith("intervene bake: error: ") and "positions='all'" in last and "Traceback" not in err
    assert not (tmp_path / "o2").exists()


_EXTRA = {  # layouts the shared tiny families do not cover: (config, kinds that bake)
    "phi": (lambda: T.PhiConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128), ALL),
    "qwen3": (lambda: T.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=128), {"attn", "heads", "embed"}),
    "neox_sequential_nobias": (lambda: T.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       use_parallel_residual=False, attention_bias=False), ALL),
    "falcon_new_arch": (lambda: T.FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, num_kv_heads=2,
                                               new_decoder_architecture=True), ALL),
}


@pytest.mark.parametrize("name", sorted(_EXTRA))
def test_more_layouts(name, tmp_path):
    make, kinds = _EXTRA[name]
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(make()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    steer = iv.Steering({SITES[k]: _vec(model, SITES[k], i) for i, k in enumerate(sorted(kinds))}, scale=2.0)
    delta, effect = _compare(model, [steer], tmp_path / "s")
    assert effect > 1e-2 and delta < TOL
    delta, effect = _compare(model, [iv.DirectionalAblation(_vec(model, "layers.0", 9), sites=ABLATION)], tmp_path / "a")
    assert effect > 1e-2 and delta < TOL


def test_post_ln_opt_refuses():
    cfg = T.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                      word_embed_proj_dim=32, do_layer_norm_before=False)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(iv.NotBakeableError, match="do_layer_norm_before=False"):
        iv.Intervenable(model, iv.Steering({"layers.1": torch.ones(32)}), attach=False).bake()
