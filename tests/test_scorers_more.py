"""The scorers after delphi's (intruder, simulation, surprisal, embedding) and the fuzzing highlight threshold, on the
keyword cache of test_autointerp (latent i fires exactly on KEYWORDS[i]) with the loopback OpenAI-compatible server
and a tiny local model; numbers checked against hand computations."""

from __future__ import annotations

import pytest
import torch

from intervene.features import (
    EmbeddingScorer,
    FuzzingScorer,
    IntruderScorer,
    OpenAIClient,
    OpenAIEmbedder,
    SimulationScorer,
    SurprisalScorer,
    TransformersEmbedder,
    sample_examples,
)
from intervene.features.score import highlighted
from tests.openai_server import OpenAIServer
from tests.test_autointerp import openai, server, word_cache  # noqa: F401  (fixtures)
from tests.test_latent_cache import word_tokenizer
from tests.tiny_models import tiny_model


def _examples(cache, latent: int = 0):
    return sample_examples(cache, latent, window=8, n_explain=4, n_score=10, n_nonactivating=8, seed=3)


def test_intruder_finds_the_random_highlights(word_cache, openai: OpenAIServer) -> None:  # noqa: F811
    ex = _examples(word_cache)
    r = IntruderScorer(OpenAIClient(openai.url, "m"), word_tokenizer(), n_shown=4).score(None, ex)
    assert r.metrics["n"] == 8 and r.metrics["n_failed"] == 0 and r.metrics["accuracy"] >= 0.85
    assert r.metrics["chance"] == 0.25 and len(openai.requests) == 8
    nonact = {e.span for e in ex.score_nonactivating}
    assert all(s.span in nonact and 0 <= s.label < 4 for s in r.samples)  # the intruder is a silent window


def test_simulation_correlates_with_the_truth(word_cache, openai: OpenAIServer) -> None:  # noqa: F811
    ex = _examples(word_cache)
    r = SimulationScorer(OpenAIClient(openai.url, "m"), word_tokenizer()).score('the word "cat"', ex)
    assert r.metrics["n_failed"] == 0 and r.metrics["n"] == 18
    # hand reference: the server predicts 10 exactly on "cat" tokens
    tok = word_tokenizer()
    cat = tok.convert_tokens_to_ids("cat")
    windows = ex.score_activating + ex.score_nonactivating
    true = torch.tensor([a for e in windows for a in e.acts], dtype=torch.float64)
    pred = torch.tensor([10.0 * (t == cat) for e in windows for t in e.tokens], dtype=torch.float64)
    want = float(torch.corrcoef(torch.stack([true, pred]))[0, 1])
    assert r.metrics["correlation"] == pytest.approx(want, abs=1e-9) and want > 0.9
    wrong = SimulationScorer(OpenAIClient(openai.url, "m"), tok).score('the word "dog"', ex)
    assert wrong.metrics["correlation"] is None or wrong.metrics["correlation"] < 0.3


def test_embedding_scorer_over_http_and_local(word_cache, openai: OpenAIServer) -> None:  # noqa: F811
    ex = _examples(word_cache)
    tok = word_tokenizer()
    r = EmbeddingScorer(OpenAIEmbedder(openai.url, "emb"), tok).score('the word "cat"', ex)
    assert r.metrics["auroc"] >= 0.9 and r.metrics["n"] == 18
    model = tiny_model("llama")
    embed = TransformersEmbedder(model, tok)
    texts = ["the cat sat", "a dog ran on the mat"]
    got = embed(texts)
    ids = tok(texts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
    torch.testing.assert_close(got[0], h / h.norm(), atol=1e-5, rtol=1e-5)  # padding does not leak into the mean
    local = EmbeddingScorer(embed, tok).score('the word "cat"', ex)
    assert local.metrics["n_failed"] == 0 and local.metrics["auroc"] is not None


def test_surprisal_is_the_loss_saved_by_the_explanation(word_cache) -> None:  # noqa: F811
    ex = _examples(word_cache)
    tok, model = word_tokenizer(), tiny_model("llama")
    scorer = SurprisalScorer(model, tok, batch_size=4)
    r = scorer.score('the word "cat"', ex)
    assert r.metrics["n"] == 18 and r.metrics["n_failed"] == 0 and r.metrics["auroc"] is not None

    def loss(prefix: str, text: str) -> float:  # one unpadded sequence, by hand
        p = tok(prefix)["input_ids"]
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + t])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        return float(torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], ids[0, len(p):]))

    from intervene.features.scorers_model import NO_EXPLANATION, SURPRISAL_PREFIX

    s = r.samples[3]
    want = loss(SURPRISAL_PREFIX.format(NO_EXPLANATION), s.text) - loss(SURPRISAL_PREFIX.format('the word "cat"'), s.text)
    assert s.probability == pytest.approx(want, abs=1e-4)


def test_fuzzing_highlight_threshold(word_cache) -> None:  # noqa: F811
    ex = _examples(word_cache)
    e = ex.score_activating[0]
    e.acts = [0.0, 0.1, 0.5, 1.0, 0.29, 0.3, 0.0, 0.2]  # a made-up profile: max 1.0
    e.max_act = 1.0
    assert highlighted(e, 0.3) == [False, False, True, True, False, True, False, False]
    assert highlighted(e) == [a > 0 for a in e.acts]
    fz = FuzzingScorer(None, word_tokenizer(), highlight_threshold=0.3, n_wrong="mean")
    samples = fz.samples(ex)
    correct = [s for s in samples if s.kind == "correct"]
    assert correct and all(s.text.count("<<") >= 1 for s in correct)
    with pytest.raises(ValueError, match="highlight_threshold"):
        FuzzingScorer(None, word_tokenizer(), highlight_threshold=1.5)
