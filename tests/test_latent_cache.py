"""The latent cache equals a dense computation, resumes to byte-identical files, and respects its
buffer bound; directions cache like latents; examples are disjoint windows."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import intervene.features.cache as cache_mod
from intervene.features import DirectionEncoder, LatentCache, LatentCacheError, cache_latents, sample_examples
from intervene.features.cache import token_rows
from tests.test_sae import rand_sae
from tests.tiny_models import VOCAB, tiny_model

CTX = 16

WORDS = ("the a cat dog sat ran on mat big red blue is not slow fast alice bob says and then home park "
         "river old tired happy small green").split()


@functools.cache
def word_tokenizer():
    """A whitespace word-level tokenizer (ids < VOCAB), with an end-of-text token after each text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    assert len(vocab) <= VOCAB
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),),
                                                          generator=g)) for _ in range(n)]


def random_tokens(n_seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n_seq, CTX), generator=torch.Generator().manual_seed(seed))


def dense_reference(model, encoder, tokens: torch.Tensor, layer: int = 1) -> torch.Tensor:
    """``[n_tokens, d_sae]``: the encoder applied to hidden_states of full rows (no cache machinery)."""
    return encoder.encode(block_output(model, tokens, layer))


def block_output(model, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """``[n_tokens, hidden]``: block ``layer``'s output, read by a plain hook (the last entry of
    ``hidden_states`` is after the final norm, so it is not used)."""
    got = {}
    handle = model.model.layers[layer].register_forward_hook(
        lambda m, a, o: got.setdefault("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(input_ids=tokens.long())
    finally:
        handle.remove()
    return got["h"].reshape(-1, got["h"].shape[-1])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and "tokenizer" not in p.parts}


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_cache_equals_dense_computation(tmp_path: Path, activation: str) -> None:
    model, sae, tokens = tiny_model("llama"), rand_sae(activation), random_tokens()
    cache = cache_latents(model, sae, tokens, tmp_path, batch_size=5, buffer_size=300, shard_width=10,
                          progress=False)
    want = dense_reference(model, sae, tokens)
    assert cache.n_tokens == tokens.numel() and cache.n_latents == sae.d_sae
    torch.testing.assert_close(cache.dense(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.tokens, tokens.to(torch.int32))
    assert torch.equal(cache.stats["count"], (want > 0).sum(0))
    torch.testing.assert_close(cache.stats["max"], want.amax(0).clamp_min(0), atol=1e-5, rtol=1e-5)
    rec = cache.latent(int(want.sum(0).argmax()))
    assert torch.all(rec.positions[1:] > rec.positions[:-1])  # ascending, across parts
    # one tokens file; shards hold positions/values/offsets only
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["stats.safetensors", "tokens.safetensors"]
    from safetensors import safe_open

    for part in tmp_path.glob("shards/*/*.safetensors"):
        with safe_open(str(part), "pt") as f:
            assert set(f.keys()) == {"positions", "values", "offsets"}


def test_cache_from_texts_keeps_the_tokenizer(tmp_path: Path) -> None:
    tok, texts = word_tokenizer(), corpus()
    cache = cache_latents(tiny_model("llama"), rand_sae(), texts, tmp_path, tokenizer=tok, ctx_len=CTX,
                          n_tokens=100, progress=False)
    rows = token_rows(texts, tok, CTX, 100)
    assert cache.tokens.shape == (100 // CTX, CTX) and torch.equal(cache.tokens, rows)
    stream = [i for t in texts for i in tok(t)["input_ids"]]
    assert cache.tokens.reshape(-1).tolist() == stream[: cache.n_tokens]
    assert cache.tokenizer().decode(cache.tokens[0].tolist()).split()[0] in WORDS + ["[EOS]"]


def test_buffer_bound_is_respected(tmp_path: Path) -> None:
    model, sae, tokens = tiny_model("llama"), rand_sae("topk"), random_tokens(16)
    buffer = 200
    cache = cache_latents(model, sae, tokens, tmp_path, batch_size=2, buffer_size=buffer, n_shards=4, progress=False)
    per_batch = (dense_reference(model, sae, tokens) > 0).reshape(8, -1).sum(1)  # 8 batches of 2 rows
    assert int(per_batch.max()) <= buffer  # so the strict bound applies
    assert 0 < cache.index["peak_buffer"] <= buffer
    assert cache.index["n_parts"] >= int(per_batch.sum()) // buffer
    # a buffer smaller than one batch flushes every batch and never holds more than that batch
    small = cache_latents(model, sae, tokens, tmp_path / "small", batch_size=2, buffer_size=10, progress=False)
    assert small.index["peak_buffer"] == int(per_batch.max()) and small.index["n_parts"] == 8
    torch.testing.assert_close(small.dense(), cache.dense())


class _Interrupt(BaseException):
    pass


@pytest.mark.parametrize("stop_after", [1, 4, 7])
def test_resume_after_interruption_gives_identical_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         stop_after: int) -> None:
    model, sae, tokens = tiny_model("llama"), rand_sae("relu"), random_tokens(20)
    kw = dict(batch_size=2, buffer_size=250, shard_width=16, progress=False)
    ref = cache_latents(model, sae, tokens, tmp_path / "ref", **kw)
    calls = {"n": 0}
    real = cache_mod._run_model

    def flaky(m, ids):
        calls["n"] += 1
        if calls["n"] > stop_after:
            raise _Interrupt
        return real(m, ids)

    monkeypatch.setattr(cache_mod, "_run_model", flaky)
    with pytest.raises(_Interrupt):
        cache_latents(model, sae, tokens, tmp_path / "run", **kw)
    with pytest.raises(LatentCacheError, match="incomplete"):
        LatentCache(tmp_path / "run")
    monkeypatch.setattr(cache_mod, "_run_model", real)
    done = cache_latents(model, sae, tokens, tmp_path / "run", **kw)
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")
    torch.testing.assert_close(done.dense(), ref.dense())


def test_crash_between_parts_and_index_is_repaired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, sae, tokens = tiny_model("llama"), rand_sae("relu"), random_tokens(12)
    kw = dict(batch_size=2, buffer_size=250, shard_width=16, progress=False)
    cache_latents(model, sae, tokens, tmp_path / "ref", **kw)
    real = cache_mod.write_json
    calls = {"n": 0}

    def flaky(path, obj):
        calls["n"] += 1
        if calls["n"] == 3:  # the second flush: its parts and stats are on disk, its index is not
            raise _Interrupt
        return real(path, obj)

    monkeypatch.setattr(cache_mod, "write_json", flaky)
    with pytest.raises(_Interrupt):
        cache_latents(model, sae, tokens, tmp_path / "run", **kw)
    monkeypatch.setattr(cache_mod, "write_json", real)
    cache_latents(model, sae, tokens, tmp_path / "run", **kw)
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


def test_settings_mismatch_is_refused_or_overwritten(tmp_path: Path) -> None:
    model, tokens = tiny_model("llama"), random_tokens(4)
    cache_latents(model, rand_sae(), tokens, tmp_path, progress=False)
    with pytest.raises(LatentCacheError, match="different settings"):
        cache_latents(model, rand_sae(seed=5), tokens, tmp_path, progress=False)
    again = cache_latents(model, rand_sae(seed=5), tokens, tmp_path, progress=False, overwrite=True)
    torch.testing.assert_close(again.dense(), dense_reference(model, rand_sae(seed=5), tokens), atol=1e-5, rtol=1e-5)
    with pytest.raises(LatentCacheError, match="no index.json"):
        LatentCache(tmp_path / "nothing")


@pytest.mark.parametrize("threshold", [0.0, None])
def test_directions_cache_like_latents(tmp_path: Path, threshold: float | None) -> None:
    from intervene.probes import MeanDiffProbe

    model, tokens = tiny_model("llama"), random_tokens(6)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 32, generator=g) + 1, torch.randn(20, 32, generator=g)])
    probe = MeanDiffProbe().fit(x, torch.cat([torch.ones(20), torch.zeros(20)]))
    enc = DirectionEncoder.from_probe(probe, site="layers.0", threshold=threshold)
    cache = cache_latents(model, enc, tokens, tmp_path, progress=False)
    h = block_output(model, tokens, 0)
    dots = h @ torch.as_tensor(probe.direction_).float()
    want = dots if threshold is None else torch.where(dots > 0, dots, torch.zeros_like(dots))
    torch.testing.assert_close(cache.dense()[:, 0], want, atol=1e-5, rtol=1e-5)
    if threshold is None:
        assert int(cache.stats["count"][0]) == tokens.numel()


def test_examples_are_disjoint_windows(tmp_path: Path) -> None:
    tok = word_tokenizer()
    cache = cache_latents(tiny_model("llama"), rand_sae("topk"), corpus(200), tmp_path, tokenizer=tok, ctx_len=32,
                          progress=False)
    frac = cache.stats["count"].float() / cache.n_tokens
    latent = int((frac - 0.15).abs().argmin())  # fires on ~15% of tokens: room for silent windows
    emb = tiny_model("llama").get_input_embeddings().weight
    for hard, e_ in (("token", None), ("similar", None), ("similar", emb), (None, None)):
        ex = sample_examples(cache, latent, window=8, n_explain=6, n_score=10, n_nonactivating=10, hard=hard,
                             embeddings=e_, seed=1)
        assert len(ex.explain) == 6 and len(ex.score_activating) == 10 and len(ex.score_nonactivating) == 10
        spans = [e.span for e in ex.all()]
        for i, (r1, a1, b1) in enumerate(spans):
            for r2, a2, b2 in spans[i + 1:]:
                assert r1 != r2 or b1 <= a2 or b2 <= a1, f"windows overlap: {(r1, a1, b1)} {(r2, a2, b2)}"
        dense = cache.dense([latent])[:, 0].view(cache.tokens.shape)
        for e in ex.explain + ex.score_activating:
            assert e.max_act > 0 and e.acts == dense[e.row, e.start:e.start + 8].tolist()
            assert e.tokens == cache.tokens[e.row, e.start:e.start + 8].tolist()
        assert all(max(e.acts) == 0 for e in ex.score_nonactivating)
        assert min(e.max_act for e in ex.explain) >= max(e.max_act for e in ex.score_activating)  # explain = top
        if hard == "token":
            assert any(e.kind == "hard" for e in ex.score_nonactivating)
    q = sample_examples(cache, latent, window=8, n_explain=5, n_score=10, n_quantiles=5, explain_from="quantiles")
    assert len({e.quantile for e in q.score_activating}) == 5
    assert sample_examples(cache, latent, seed=3).to_json() == sample_examples(cache, latent, seed=3).to_json()


def test_cooccurrence_is_one_sparse_row(tmp_path: Path) -> None:
    model, sae, tokens = tiny_model("llama"), rand_sae("topk"), random_tokens(8)
    cache = cache_latents(model, sae, tokens, tmp_path, shard_width=7, progress=False)
    fired = dense_reference(model, sae, tokens) > 0
    co = (fired[:, 3:4] & fired).sum(0)
    co[3] = 0
    got = dict(cache.cooccurring(3, top=sae.d_sae))
    assert got == {i: int(c) for i, c in enumerate(co.tolist()) if c > 0}


def test_steering_vector_as_a_latent(tmp_path: Path) -> None:
    import intervene as iv

    model, tokens = tiny_model("llama"), random_tokens(4)
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    enc = DirectionEncoder.from_steering(iv.Steering({"layers.1": v}, scale=3.0, name="steer"), threshold=None)
    assert enc.site == "layers.1" and enc.names == ["steer"]
    cache = cache_latents(model, enc, tokens, tmp_path, progress=False)
    want = block_output(model, tokens, 1) @ (v / v.norm())
    torch.testing.assert_close(cache.dense()[:, 0], want, atol=1e-5, rtol=1e-5)
