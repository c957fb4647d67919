"""REMEDI editors: the edit against a hand-written hook, KV-cache exactness, the loss against a hand
computation, frozen-LM training, persistence and baking, on tiny random models of several families."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from intervene import Intervenable, NotBakeableError
from intervene.errors import InterventionError
from intervene.methods.remedi.intervention import Remedi, RemediEditor
from intervene.methods.remedi.states import left_pad, prompt_entity_tokens
from intervene.methods.remedi.train import encode_samples, remedi_loss
from intervene.sites import resolve_site
from tests.tiny_models import FAMILIES, HIDDEN, tiny_model

ENTITIES = ["Zor", "Quil", "Vex", "Brun", "Tal", "Mor", "Kes", "Dra", "Fen", "Gul", "Hax", "Jor"]
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Sydney"]
WORDS = "lives in is a resident of The home city , .".split()
TRAIN_FAMILIES = ["llama", "gpt2", "gpt_neox", "llama_gqa"]



@functools.cache
def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer (offsets work) with a BOS token, built in-process; < 96 ids."""
    words = ["[PAD]", "[UNK]", "<s>", *ENTITIES, *CITIES, *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>")


def make_samples(n: int, seed: int = 0, entity_last: bool = False) -> list[dict]:
    """Counterfactual "X lives in Y" edits over a random world. ``entity_last`` puts the entity at the end
    of the prompt ("The home city of X"): a random 2-layer model passes a single-token edit on to later
    positions only weakly, so that is where training is judged."""
    rng = random.Random(seed)
    true = {e: random.Random(e).choice(CITIES) for e in ENTITIES}
    out = []
    for _ in range(n):
        e = rng.choice(ENTITIES)
        new = rng.choice([c for c in CITIES if c != true[e]])
        others = rng.sample([x for x in ENTITIES if x != e], 2)
        out.append({
            "entity": e, "context": f"{e} lives in {new} .", "attribute": new,
            "prompt": f"The home city of {e}" if entity_last else f"{e} lives in",
            "target_new": f" {new}", "target_true": f" {true[e]}",
            "paraphrase_prompts": [f"{e} is a resident of", f"The home city of {e} is"],
            "neighborhood_prompts": [f"{o} lives in" for o in others],
            "neighborhood_targets": [f" {true[o]}" for o in others],
        })
    return out


def random_remedi(layer: int = 0, rank: int | None = None, use_entity: bool = False, alpha: float = 1.0,
                  seed: int = 0, scale: float = 1.0, side: str = "output") -> Remedi:
    editor = RemediEditor(HIDDEN, rank, use_entity)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return Remedi(layer, HIDDEN, rank, alpha, use_entity, editor=editor, side=side)


PROMPTS = ["Zor lives in", "The home city of Quil is", "Vex , Brun is a resident of"]
PROMPT_ENTITIES = ["Zor", "Quil", "Brun"]  # the third prompt mentions two entities


def batch_and_positions(tok: PreTrainedTokenizerFast) -> tuple[dict, list[int], list[int]]:
    seqs, pos = prompt_entity_tokens(tok, PROMPTS, PROMPT_ENTITIES)
    ids, mask = left_pad(seqs, tok.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}, [p[0] for p in pos], [ids.shape[1] - len(s) for s in seqs]


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_matches_hand_written_hook(family: str) -> None:
    """alpha·d_i lands on row i's entity token only, left padding excluded, on every family."""
    model, tok = tiny_model(family), make_tokenizer()
    batch, pos, pad = batch_and_positions(tok)
    assert pos == [1, 5, 3]  # <s> counts; the third prompt edits its *last* entity mention ("Brun")
    d = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    remedi = Remedi(0, HIDDEN, alpha=0.5)
    with Intervenable(model, [remedi]) as ivm, remedi.editing_with(d, pos):
        got = ivm(**batch).logits

    block = resolve_site(model, "layers.0").module

    def hook(_m, _a, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        for i in range(3):
            h[i, pad[i] + pos[i]] += 0.5 * d[i]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = block.register_forward_hook(hook)
    try:
        want = model(**batch).logits
    finally:
        handle.remove()
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[real], model(**batch).logits[real], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_input_side_edit_matches_hand_written_pre_hook(family: str) -> None:
    """side="input" edits the block's input (layer 0: the embeddings) and encodes attributes there too."""
    model, tok = tiny_model(family), make_tokenizer()
    batch, pos, pad = batch_and_positions(tok)
    remedi = random_remedi(layer=0, side="input", scale=0.3)
    ctxs = [f"{e} lives in Tokyo ." for e in PROMPT_ENTITIES]
    with Intervenable(model, [remedi]) as ivm:
        d = remedi.directions(ivm, tok, ctxs, ["Tokyo"] * 3)
        with remedi.editing_with(d, pos):
            got = ivm(**batch).logits
    block = resolve_site(model, "layers.0").module
    seen = []

    def pre(_m, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        for i in range(3):
            h[i, pad[i] + pos[i]] += d[i]
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        want = model(**batch).logits
    finally:
        handle.remove()
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    # The attribute state is the mean embedding-level input over the attribute's tokens.
    ids = torch.tensor([tok(ctxs[0])["input_ids"]])
    seen.clear()
    handle = block.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    h_attr = seen[0][0, 4]  # "<s> Zor lives in Tokyo ." -> "Tokyo" is token 4
    p = next(remedi.editor.parameters())
    torch.testing.assert_close(d[0], remedi.editor(h_attr[None].to(p.dtype))[0].detach())


@pytest.mark.parametrize("family", TRAIN_FAMILIES)
def test_generate_same_with_and_without_cache(family: str) -> None:
    model, tok = tiny_model(family), make_tokenizer()
    remedi = random_remedi(scale=0.5, alpha=30.0)  # strong enough to change greedy tokens
    ctxs = [f"{e} lives in Tokyo ." for e in PROMPT_ENTITIES]
    ivm = Intervenable(model, [remedi])
    try:
        with remedi.edit(ivm, tok, PROMPTS, PROMPT_ENTITIES, ctxs, ["Tokyo"] * 3) as batch:
            kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            cached = ivm.generate(**batch, use_cache=True, **kw)
            scores = ivm.generate(**batch, output_scores=True, return_dict_in_generate=True, **kw).scores
            uncached = ivm.generate(**batch, use_cache=False, **kw)
            beams = ivm.generate(**batch, num_beams=2, num_return_sequences=2, use_cache=True, **kw)
            beams_nc = ivm.generate(**batch, num_beams=2, num_return_sequences=2, use_cache=False, **kw)
        with ivm.disabled():
            base = ivm.generate(**batch, output_scores=True, return_dict_in_generate=True, **kw).scores
        # Rows expanded by beams use their example's edit: each example alone gives the same beams.
        for i in range(3):
            with remedi.edit(ivm, tok, PROMPTS[i:i + 1], PROMPT_ENTITIES[i:i + 1], ctxs[i:i + 1], ["Tokyo"]) as one:
                alone = ivm.generate(**one, num_beams=2, num_return_sequences=2, use_cache=True, **kw)
            assert torch.equal(alone[:, -6:], beams[2 * i:2 * i + 2, -6:])
    finally:
        ivm.detach()
    assert torch.equal(cached, uncached)
    assert torch.equal(beams, beams_nc)
    # The edit is live during generate (tiny random models barely move their logits, so not the tokens).
    assert (scores[0] - base[0]).abs().max() > 1e-3


def test_kl_and_target_terms_match_hand_computation() -> None:
    """Batch of 3 prompts of different lengths (left padded): each term equals a per-example loop."""
    model, tok = tiny_model("llama"), make_tokenizer()
    remedi = random_remedi(scale=0.3)
    samples = make_samples(3, seed=3)
    samples[1]["prompt"] = f"The home city of {samples[1]['entity']} , is"
    samples[2]["prompt"] = f"{samples[2]['entity']} is a resident of"
    enc = encode_samples(remedi, model, tok, samples)
    assert len({len(p) for p in enc.prompt_ids}) == 3
    with Intervenable(model, [remedi]) as ivm, torch.no_grad():
        parts = remedi_loss(remedi, ivm, enc, [0, 1, 2], lam_m=1.0, lam_u=1.0, lam_kl=1.0)
        d = remedi.editor(enc.h_attr)
        kl, new, true = 0.0, 0.0, 0.0
        for i in range(3):
            ids = torch.tensor([enc.prompt_ids[i]])
            with remedi.editing_with(d[i:i + 1], [enc.entity_pos[i]]):
                lp_edit = torch.log_softmax(ivm(input_ids=ids).logits[0].double(), -1)
            with ivm.disabled():
                lp_base = torch.log_softmax(ivm(input_ids=ids).logits[0].double(), -1)
            for t in range(enc.entity_pos[i], ids.shape[1] - 1):  # S_i: entity .. before the last token
                kl += float((lp_base[t].exp() * (lp_base[t] - lp_edit[t])).sum())
            new += -float(lp_edit[-1, enc.new_ids[i][0]])
            true += -float(torch.log1p(-lp_edit[-1, enc.true_ids[i][0]].exp()))
    assert parts.kl.item() == pytest.approx(kl / 3, rel=1e-4, abs=1e-6)
    assert parts.new.item() == pytest.approx(new / 3, rel=1e-5)
    assert parts.true.item() == pytest.approx(true / 3, rel=1e-4, abs=1e-7)
    assert parts.kl.item() > 0
    assert parts.total.item() == pytest.approx(parts.new.item() + parts.true.item() + parts.kl.item(), rel=1e-5)


@pytest.mark.parametrize("family", TRAIN_FAMILIES)
def test_training_raises_efficacy_with_a_frozen_lm(family: str) -> None:
    model, tok = tiny_model(family), make_tokenizer()
    samples = make_samples(32, seed=1, entity_last=True)
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    remedi = Remedi.fit(model, tok, samples, layer=0, lr=0.05, epochs=4, batch_size=8, val_fraction=0.25,
                        patience=4, lam_kl=0.1, progress=False)
    # The LM: no gradient allocated, flags untouched, weights unchanged.
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    hist = remedi.history_
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.05
    assert remedi.best_epoch_ > 0 and remedi.n_val_ == 8
    eff = {}
    with Intervenable(model, [remedi]) as ivm:
        with remedi.edit_samples(ivm, tok, samples) as batch:
            lp = torch.log_softmax(ivm(**batch).logits[:, -1], -1)
            with ivm.disabled():
                lp0 = torch.log_softmax(ivm(**batch).logits[:, -1], -1)
    new = [tok(s["target_new"], add_special_tokens=False)["input_ids"][0] for s in samples]
    true = [tok(s["target_true"], add_special_tokens=False)["input_ids"][0] for s in samples]
    rows = torch.arange(len(samples))
    for name, x in (("edited", lp), ("base", lp0)):
        eff[name] = float((x[rows, new] > x[rows, true]).float().mean())
    assert eff["edited"] >= 0.9 and eff["edited"] >= eff["base"] + 0.3, eff


def test_fit_is_seeded_and_leaves_global_rng_alone() -> None:
    model, tok = tiny_model("llama"), make_tokenizer()
    samples = make_samples(12, seed=2)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = Remedi.fit(model, tok, samples, layer=0, rank=3, lr=0.05, epochs=2, batch_size=4, seed=7, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = Remedi.fit(model, tok, samples, layer=0, rank=3, lr=0.05, epochs=2, batch_size=4, seed=7, progress=False)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert a.history_ == b.history_


def test_low_rank_full_sequence_training_runs() -> None:
    model, tok = tiny_model("gpt2"), make_tokenizer()
    samples = make_samples(12, seed=4)
    for s in samples:  # two-token targets exercise the teacher-forced scoring
        s["target_new"] += " ."
        s["target_true"] += " ."
    remedi = Remedi.fit(model, tok, samples, layer=0, rank=2, use_entity=True, lr=0.01, epochs=3, batch_size=6,
                        full_sequence_targets=True, norm_penalty=0.01, progress=False, patience=5)
    assert remedi.rank == 2 and remedi.use_entity and remedi.config["full_sequence_targets"]
    assert remedi.history_[-1]["train_loss"] < remedi.history_[0]["train_loss"]


def test_save_load_roundtrip_reproduces_edited_logits(tmp_path) -> None:
    model, tok = tiny_model("llama_gqa"), make_tokenizer()
    remedi = random_remedi(layer=1, rank=4, use_entity=True, alpha=0.7, scale=0.2, side="input")
    remedi.config = {"lam_kl": 3.0, "lam_u": 0.5}
    samples = make_samples(4, seed=5)
    with Intervenable(model, [remedi]) as ivm:
        with remedi.edit_samples(ivm, tok, samples) as batch:
            want = ivm(**batch).logits
        ivm.save_pretrained(tmp_path / "diff")
    loaded = Intervenable.load(tmp_path / "diff", model)
    try:
        (r2,) = loaded.interventions
        assert isinstance(r2, Remedi)
        assert (r2.site, r2.rank, r2.alpha, r2.use_entity) == ("layers.1:input", 4, 0.7, True)
        assert r2.config == {"lam_kl": 3.0, "lam_u": 0.5}
        with r2.edit_samples(loaded, tok, samples) as batch:
            got = loaded(**batch).logits
    finally:
        loaded.detach()
    assert torch.equal(got, want)


def test_bake_refuses_remedi() -> None:
    model = tiny_model("llama")
    ivm = Intervenable(model, [random_remedi()], attach=False)
    with pytest.raises(NotBakeableError, match="input"):
        ivm.bake()


def test_clear_errors() -> None:
    model, tok = tiny_model("llama"), make_tokenizer()
    remedi = random_remedi()
    with pytest.raises(InterventionError, match="does not occur"):
        remedi.directions(model, tok, ["Zor lives in Tokyo ."], ["Paris"])
    with pytest.raises(InterventionError, match="entity"):
        with remedi.edit(model, tok, ["Zor lives in"], ["Quil"], ["Quil lives in Rome ."], ["Rome"]):
            pass

    class Slow:
        is_fast = False

        def __call__(self, text, **kw):
            raise NotImplementedError

    with pytest.raises(InterventionError, match="fast tokenizer"):
        remedi.directions(model, Slow(), ["Zor lives in Tokyo ."], ["Tokyo"])
    with pytest.raises(InterventionError, match="lacks"):
        Remedi.fit(model, tok, [{"entity": "Zor"}], layer=0, progress=False)
    with pytest.raises(InterventionError, match="directions must be"):
        remedi.set_edit(torch.zeros(2, HIDDEN + 1), [1, 1])
    assert not remedi.editing


def test_edit_composes_with_other_interventions_and_cleans_up() -> None:
    """Attribute encodings run on the base model even while other edits are attached."""
    from intervene import Steering

    model, tok = tiny_model("llama"), make_tokenizer()
    remedi = random_remedi(scale=0.3)
    steer = Steering({"layers.0": torch.ones(HIDDEN)}, scale=5.0)
    d_plain = remedi.directions(model, tok, ["Zor lives in Tokyo ."], ["Tokyo"])
    with Intervenable(model, [steer, remedi]) as ivm:
        d_attached = remedi.directions(ivm, tok, ["Zor lives in Tokyo ."], ["Tokyo"])
        with remedi.edit(ivm, tok, ["Zor lives in"], ["Zor"], ["Zor lives in Tokyo ."], ["Tokyo"]):
            assert remedi.editing
        assert not remedi.editing
    torch.testing.assert_close(d_plain, d_attached)


def test_bfloat16_model_float32_editor(tmp_path) -> None:
    model, tok = tiny_model("qwen2", torch.bfloat16), make_tokenizer()
    remedi = Remedi.fit(model, tok, make_samples(8, seed=6), layer=0, lr=0.02, epochs=1, batch_size=4,
                        progress=False)
    assert next(remedi.editor.parameters()).dtype == torch.float32
    with Intervenable(model, [remedi]) as ivm:
        with remedi.edit_samples(ivm, tok, make_samples(2, seed=7)) as batch:
            logits = ivm(**batch).logits
        ivm.save_pretrained(tmp_path / "d")
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "d" / "intervene_weights.safetensors").values())
