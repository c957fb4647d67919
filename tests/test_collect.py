"""collect(): exact activations at every kind of site and position, padding, the disk cache, offload."""

from __future__ import annotations

import copy
import functools
import inspect
import json

import pytest
import torch

import intervene.activations.extract as collect_mod
from intervene.activations import ActivationCacheError, Activations, collect
from intervene.errors import PositionsError, SiteError
from intervene.hooks import count_hooks
from tests.tiny_models import tiny_model

WORDS = ("the cat sat on a mat dog ran fast slow big small red blue is not true false yes no "
         "alice bob says q a answer question statement or").split()
TEXTS = ["the cat sat on a mat", "dog ran", "the big red dog is not slow", "no",
         "alice says the cat is blue", "bob ran fast"]


@functools.cache
def word_tokenizer(padding_side: str = "left"):
    """A WordLevel tokenizer over WORDS (ids < 40, so it fits every tiny model), with offsets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    tok.padding_side = padding_side
    return tok


# Hand-written module paths (independent of intervene.sites): block list, attn out-proj, MLP out.
PATHS = {
    "llama": ("model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "llama_gqa": ("model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("transformer.h", "attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h"),
}


def reference(model, tok, texts):
    """Left-padded forward with output_hidden_states plus manual hooks at every layer's modules."""
    enc = tok(texts, padding=True, return_tensors="pt")
    kwargs = dict(enc)
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    blocks, attn, mlp = PATHS[model.config._name_or_path.removeprefix("tiny-")]
    got, handles = {}, []
    for i, block in enumerate(model.get_submodule(blocks)):
        def out_hook(name):
            return lambda m, a, o: got.__setitem__(name, (o[0] if isinstance(o, tuple) else o).detach().clone())
        handles.append(block.register_forward_hook(out_hook(f"block{i}")))
        handles.append(block.get_submodule(mlp).register_forward_hook(out_hook(f"mlp{i}")))
        handles.append(block.get_submodule(attn).register_forward_hook(out_hook(f"attn{i}")))
        handles.append(block.get_submodule(attn).register_forward_pre_hook(
            lambda m, a, i=i: got.__setitem__(f"heads{i}", a[0].detach().clone())))
    try:
        with torch.no_grad():
            out = model(**kwargs, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return enc["attention_mask"], out.hidden_states, got


@pytest.mark.parametrize("family", list(PATHS))
def test_matches_hidden_states_and_manual_hooks(family: str) -> None:
    model, tok = tiny_model(family), word_tokenizer("left")
    texts = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[5]]  # 6, 2, 7, 3 tokens
    mask, hidden, got = reference(model, tok, texts)
    n_layers = model.config.num_hidden_layers
    sites = ["layers.*", "layers.*.attn", "layers.*.mlp", "layers.*.heads"]
    acts = collect(model, tok, texts, sites, batch_size=4, progress=False)  # the same batch as the reference
    lens = mask.sum(-1)
    assert acts.n == 4 and acts.labels is None
    for i in range(n_layers):
        if i < n_layers - 1:  # hidden_states[-1] is after the final norm
            assert torch.equal(acts[f"layers.{i}"], hidden[i + 1][:, -1])
        assert torch.equal(acts[f"layers.{i}"], got[f"block{i}"][:, -1])
        assert torch.equal(acts[f"layers.{i}.mlp"], got[f"mlp{i}"][:, -1])
        assert torch.equal(acts[f"layers.{i}.attn"], got[f"attn{i}"][:, -1])
        heads = acts[f"layers.{i}.heads"]
        assert heads.shape == (4, 4, 32 // 4)
        assert torch.equal(heads.flatten(1), got[f"heads{i}"][:, -1])
    # explicit indices are absolute in each text's own tokens, negative from the end
    two = collect(model, tok, texts, "layers.0", positions=[0, -2], batch_size=4, progress=False)["layers.0"]
    s = mask.shape[1]
    for r in range(4):
        first = s - int(lens[r])
        assert torch.equal(two[r, 0], hidden[1][r, first])
        assert torch.equal(two[r, 1], hidden[1][r, s - 2])
    # "all": flat over real tokens, in order
    flat = collect(model, tok, texts, "layers.0", positions="all", batch_size=4, progress=False)
    assert flat.offsets.tolist() == [0, *lens.cumsum(0).tolist()]
    assert torch.equal(flat["layers.0"], hidden[1][mask.bool()])
    assert torch.equal(flat.example("layers.0", 2), hidden[1][2, s - int(lens[2]):])


def test_mean_over_character_span() -> None:
    model, tok = tiny_model("llama"), word_tokenizer("left")
    texts = ["the cat sat on", "alice says the dog is blue"]  # 4 and 6 tokens: the first is padded
    spans = [(4, 11), (15, 26)]  # "cat sat" (tokens 1-2), "dog is blue" (tokens 3-5)
    mask, hidden, _ = reference(model, tok, texts)
    acts = collect(model, tok, texts, "layers.0", positions="mean", span=spans, progress=False)
    assert torch.allclose(acts["layers.0"][0], hidden[1][0, 3:5].mean(0), atol=1e-6)
    assert torch.allclose(acts["layers.0"][1], hidden[1][1, 3:6].mean(0), atol=1e-6)
    # a field of the rows, or a callable on the rows, give the same
    rows = [{"text": t, "answer_span": sp, "label": i} for i, (t, sp) in enumerate(zip(texts, spans))]
    by_field = collect(model, tok, rows, "layers.0", positions="mean", span="answer_span", progress=False)
    by_fn = collect(model, tok, rows, "layers.0", positions="mean", span=lambda r: r["answer_span"], progress=False)
    assert torch.equal(by_field["layers.0"], acts["layers.0"]) and torch.equal(by_fn["layers.0"], acts["layers.0"])
    assert by_field.labels.tolist() == [0, 1]
    # no span: the mean over every real token
    full = collect(model, tok, texts, "layers.0", positions="mean", progress=False)
    assert torch.allclose(full["layers.0"][0], hidden[1][0, 2:].mean(0), atol=1e-6)
    assert torch.allclose(full["layers.0"][1], hidden[1][1].mean(0), atol=1e-6)


def test_padding_side_and_batch_composition_do_not_change_results() -> None:
    for family in ("gpt2", "llama"):  # absolute (learned) and rotary positions
        model = tiny_model(family)
        left = collect(model, word_tokenizer("left"), TEXTS, "layers.*", batch_size=4, progress=False)
        right = collect(model, word_tokenizer("right"), TEXTS, "layers.*", batch_size=4, progress=False)
        alone = collect(model, word_tokenizer("left"), TEXTS, "layers.*", batch_size=1, progress=False)
        for site in left:
            assert torch.allclose(left[site], right[site], atol=1e-5)
            assert torch.allclose(left[site], alone[site], atol=1e-5)


def test_rows_give_labels_and_metadata() -> None:
    rows = [{"text": t, "label": i % 2, "character": "Alice" if i < 3 else "Bob", "choices": ["a", "b"]}
            for i, t in enumerate(TEXTS)]
    acts = collect(tiny_model("llama"), word_tokenizer(), rows, "layers.0", progress=False)
    assert acts.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert acts.column("character")[3] == "Bob" and "choices" not in acts.meta and "text" not in acts.meta
    assert acts.stack().shape == (1, 6, 32)


def test_half_precision_model_and_output_dtype() -> None:
    model = tiny_model("llama", torch.bfloat16)
    tok = word_tokenizer()
    acts = collect(model, tok, TEXTS[:3], "layers.0", progress=False)
    _, hidden, _ = reference(model, tok, TEXTS[:3])
    assert acts["layers.0"].dtype == torch.float32
    assert torch.equal(acts["layers.0"], hidden[1][:, -1].float())
    half = collect(model, tok, TEXTS[:3], "layers.0", dtype=torch.bfloat16, progress=False)
    assert half["layers.0"].dtype == torch.bfloat16


def test_errors_are_named_and_hooks_always_removed() -> None:
    model, tok = tiny_model("llama"), word_tokenizer()
    before = count_hooks(model)
    with pytest.raises(PositionsError, match="out of range"):
        collect(model, tok, ["no", "the cat sat"], "layers.0", positions=[2], progress=False)
    with pytest.raises(PositionsError, match="covers no token"):
        collect(model, tok, ["the cat"], "layers.0", positions="mean", span=[(3, 4)], progress=False)
    with pytest.raises(PositionsError, match="fast tokenizer"):
        slow = copy.copy(tok)
        slow.__class__ = type("SlowTok", (type(tok),), {"is_fast": property(lambda self: False)})
        collect(model, slow, ["the cat"], "layers.0", positions="mean", span=[(0, 3)], progress=False)
    with pytest.raises(PositionsError):
        collect(model, tok, ["the cat"], "layers.0", positions="first", progress=False)
    with pytest.raises(SiteError):
        collect(model, tok, ["the cat"], "layers.9", progress=False)
    assert count_hooks(model) == before
    unused = copy.deepcopy(model)
    unused.spare = torch.nn.Linear(2, 2)  # a module the forward never calls
    with pytest.raises(SiteError, match="did not run"):
        collect(unused, tok, ["the cat"], ["layers.0", "spare"], progress=False)
    assert count_hooks(unused) == before


def test_stop_early_is_exact() -> None:
    model, tok = tiny_model("gpt_neox"), word_tokenizer()
    a = collect(model, tok, TEXTS, ["layers.0", "layers.0.heads"], progress=False)
    b = collect(model, tok, TEXTS, ["layers.0", "layers.0.heads"], stop_early=False, progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the disk cache ---------------------------------------------------------------------------
_REAL_RUN_BATCH = collect_mod._run_batch


class Interrupted(BaseException):
    """Like a KeyboardInterrupt in the middle of a run (a BaseException, not an Exception)."""


def _counting(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Count batches run (their sizes); raise Interrupted before batch ``fail_after`` + 1."""
    calls = []
    real = _REAL_RUN_BATCH

    def run(model, inputs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted
        calls.append(inputs["input_ids"].shape[0])
        return real(model, inputs)

    monkeypatch.setattr(collect_mod, "_run_batch", run)
    return calls


def test_cache_roundtrip_reuse_and_lazy_reads(tmp_path, monkeypatch) -> None:
    model, tok = tiny_model("llama"), word_tokenizer()
    sites = ["layers.*", "layers.1.heads"]
    mem = collect(model, tok, TEXTS, sites, batch_size=2, progress=False)
    calls = _counting(monkeypatch)
    disk = collect(model, tok, TEXTS, sites, batch_size=2, cache_dir=tmp_path, shard_bytes=1, progress=False)
    assert len(calls) == 3 and disk.cache_path is not None
    index = json.loads((disk.cache_path / "index.json").read_text())
    assert index["complete"] and len(index["shards"]) == 3 and index["n"] == 6
    assert list(disk) == list(mem) == ["layers.0", "layers.1", "layers.1.heads"]
    for site in mem:
        assert torch.equal(disk[site], mem[site])
    assert torch.equal(disk.example("layers.1.heads", 3), mem["layers.1.heads"][3])
    again = collect(model, tok, TEXTS, sites, batch_size=2, cache_dir=tmp_path, progress=False)
    assert len(calls) == 3  # served from the cache, the model did not run
    assert torch.equal(again["layers.0"], mem["layers.0"])
    opened = Activations.open(disk.cache_path)
    assert opened.n == 6 and torch.equal(opened["layers.1"], mem["layers.1"])
    # another model with the same config, other texts, other positions: other cache entries
    collect(tiny_model("llama", seed=1), tok, TEXTS, sites, cache_dir=tmp_path, progress=False)
    collect(model, tok, TEXTS[:5], sites, cache_dir=tmp_path, progress=False)
    ragged = collect(model, tok, TEXTS, "layers.0", positions="all", cache_dir=tmp_path, shard_bytes=1,
                     batch_size=4, progress=False)
    ragged_mem = collect(model, tok, TEXTS, "layers.0", positions="all", progress=False)
    assert torch.equal(ragged.offsets, ragged_mem.offsets) and torch.equal(ragged["layers.0"], ragged_mem["layers.0"])
    assert len(list(tmp_path.iterdir())) == 4


def test_interrupted_run_resumes_to_identical_arrays(tmp_path, monkeypatch) -> None:
    model, tok = tiny_model("llama_gqa"), word_tokenizer()
    texts = TEXTS * 3  # 18 texts, batches of 4 -> 5 batches
    clean = collect(model, tok, texts, ["layers.*", "layers.0.heads"], batch_size=4, cache_dir=tmp_path / "a",
                    shard_bytes=1, progress=False)
    calls = _counting(monkeypatch, fail_after=3)
    with pytest.raises(Interrupted):
        collect(model, tok, texts, ["layers.*", "layers.0.heads"], batch_size=4, cache_dir=tmp_path / "b",
                shard_bytes=1, progress=False)
    (entry,) = (tmp_path / "b").iterdir()
    index = json.loads((entry / "index.json").read_text())
    assert not index["complete"] and [s["stop"] for s in index["shards"]] == [4, 8, 12]
    with pytest.raises(ActivationCacheError, match="incomplete"):
        Activations.open(entry)
    calls = _counting(monkeypatch)
    resumed = collect(model, tok, texts, ["layers.*", "layers.0.heads"], batch_size=4, cache_dir=tmp_path / "b",
                      shard_bytes=1, progress=False)
    assert calls == [4, 2]  # only the missing batches ran
    for site in clean:
        assert torch.equal(resumed[site], clean[site])


def test_corrupt_or_truncated_shards_raise(tmp_path) -> None:
    model, tok = tiny_model("llama"), word_tokenizer()
    acts = collect(model, tok, TEXTS, "layers.*", batch_size=2, cache_dir=tmp_path, shard_bytes=1, progress=False)
    root = acts.cache_path
    shard = root / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped bit pattern in the tensor data
    shard.write_bytes(bytes(data))
    lazy = Activations.open(root)  # sizes match: opening is fine ...
    with pytest.raises(ActivationCacheError, match="sha256"):
        lazy["layers.0"]  # ... reading is not
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ActivationCacheError, match="truncated"):
        collect(model, tok, TEXTS, "layers.*", batch_size=2, cache_dir=tmp_path, progress=False)
    (root / "index.json").write_text("{not json")
    with pytest.raises(ActivationCacheError, match="not valid JSON"):
        Activations.open(root)


# ---- accelerate offload -----------------------------------------------------------------------
def test_accelerate_cpu_and_disk_offload_give_the_same_activations(tmp_path) -> None:
    accelerate = pytest.importorskip("accelerate")
    base = tiny_model("llama")
    tok = word_tokenizer()
    want = collect(base, tok, TEXTS, ["layers.*", "layers.1.heads", "layers.0.mlp"], batch_size=4, progress=False)
    sites = list(want)

    offloaded = accelerate.cpu_offload(copy.deepcopy(base), execution_device="cpu")
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    got = collect(offloaded, tok, TEXTS, sites, batch_size=4, cache_dir=tmp_path / "c", progress=False)
    assert all(torch.equal(got[k], want[k]) for k in sites)

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    disk = accelerate.dispatch_model(copy.deepcopy(base), device_map=device_map, offload_dir=str(tmp_path / "off"))
    got = collect(disk, tok, TEXTS, sites, batch_size=4, progress=False)
    assert all(torch.equal(got[k], want[k]) for k in sites)
    # the early stop left accelerate's hooks in a usable state: a full forward still matches
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(disk(**enc).logits, base(**enc).logits, atol=1e-6)


def test_hf_dataset_rows_go_in() -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]
    ds = datasets.Dataset.from_list(rows)
    model, tok = tiny_model("llama"), word_tokenizer()
    a = collect(model, tok, ds, "layers.0", progress=False)
    b = collect(model, tok, rows, "layers.0", progress=False)
    assert torch.equal(a["layers.0"], b["layers.0"]) and a.labels.tolist() == [0, 1, 0, 1, 0, 1]
