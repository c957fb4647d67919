"""Explain and score: highlighting, parsing, metrics, the HTTP client's retries / concurrency / rate
limit against a loopback OpenAI-compatible server, the local transformers client, the pipeline's
files, and the CLI end to end."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from intervene.features import (
    ClientError,
    DetectionScorer,
    DirectionEncoder,
    Explainer,
    FuzzingScorer,
    OpenAIClient,
    TransformersClient,
    binary_metrics,
    cache_latents,
    explain_latents,
    highlight,
    load_explanations,
    parse_explanation,
    sample_examples,
    score_latents,
)
from intervene.features.explain import TokenText
from intervene.features.score import parse_answers
from tests.openai_server import OpenAIServer
from tests.test_latent_cache import corpus, word_tokenizer
from tests.test_sae import rand_sae
from tests.tiny_models import tiny_model

KEYWORDS = ["cat", "dog", "park", "river"]



@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    srv = OpenAIServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def openai(server: OpenAIServer) -> OpenAIServer:
    server.reset()
    return server


@pytest.fixture(scope="module")
def word_cache(tmp_path_factory: pytest.TempPathFactory):
    """Latent i fires exactly on the word KEYWORDS[i] (embedding directions read at block 0's input)."""
    model, tok = tiny_model("llama"), word_tokenizer()
    emb = model.get_input_embeddings().weight.detach()
    d = emb[[tok.convert_tokens_to_ids(w) for w in KEYWORDS]]
    enc = DirectionEncoder(d, site="layers.0:input", bias=-0.8 * (d * d).sum(1), threshold=0.0, names=KEYWORDS)
    return cache_latents(model, enc, corpus(300, seed=1), tmp_path_factory.mktemp("cache"), tokenizer=tok,
                         ctx_len=32, progress=False)


# ---- text ------------------------------------------------------------------------------------
def test_highlight_and_token_text() -> None:
    assert highlight(["The", " cat", " sat", " on", " it"], [False, True, True, False, True]) == "The <<cat sat>> on <<it>>"
    tok = word_tokenizer()
    ids = tok("the cat sat on a mat", add_special_tokens=False)["input_ids"]
    parts = TokenText(tok)(ids)
    assert "".join(parts) == tok.decode(ids) and parts[1] == " cat"


def test_parse_explanation_and_answers() -> None:
    assert parse_explanation("thinking...\n[EXPLANATION]: numbers after 'is'\n") == "numbers after 'is'"
    assert parse_explanation("[explanation]: a\nmore\n[EXPLANATION]: b") == "b"
    assert parse_explanation("just a line\n\nfinal words") == "final words"
    assert parse_explanation(None) == ""
    assert parse_answers("Answer: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_answers("[1, 0]", 3) == [None] * 3
    assert parse_answers(" Yes, it does", 1) == [1]
    assert parse_answers("0", 1) == [0]
    assert parse_answers("maybe", 1) == [None]


def test_binary_metrics_match_sklearn() -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (40,), generator=g).tolist()
    prob = torch.rand(40, generator=g).tolist()
    pred = [int(p > 0.4) for p in prob]
    m = binary_metrics(y + [1], pred + [None], prob + [None])  # one failed sample, left out
    assert m["n"] == 41 and m["n_failed"] == 1
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, prob))
    assert binary_metrics([1, 1], [1, 1])["balanced_accuracy"] is None  # one class: undefined, not 1.0


# ---- the HTTP client -------------------------------------------------------------------------
def _msgs(text: str = "Example 1: the <<cat>> sat\n\nWhat do the marked tokens have in common?"):
    return [{"role": "system", "content": "s"}, {"role": "user", "content": text}]


def test_openai_client_retries_429_and_500(openai: OpenAIServer) -> None:
    slept: list[float] = []
    client = OpenAIClient(openai.url, "m", api_key="sk-test", backoff=0.25, max_retries=3, sleep=slept.append)
    openai.fail_next(1, 429)
    openai.fail_next(1, 500)
    assert parse_explanation(client.generate(_msgs())) == 'the word "cat"'
    assert client.n_retries == 2 and len(openai.requests) == 3
    assert slept == [0.0, 0.5]  # 429 honours Retry-After: 0; the 500 backs off 0.25 * 2**1
    assert openai.requests[0]["auth"] == "Bearer sk-test" and openai.requests[0]["payload"]["model"] == "m"
    openai.fail_next(4, 503)
    with pytest.raises(ClientError, match="giving up after 4 attempts.*503"):
        client.generate(_msgs())
    openai.fail_next(1, 400)
    with pytest.raises(ClientError, match="HTTP 400"):
        client.generate(_msgs())
    assert slept.count(0.25) == 1 and len(openai.requests) == 3 + 4 + 1  # the 400 is not retried
    openai.fail_next(4, 500)  # one request's every attempt fails: it comes back as None, the next is fine
    serial = OpenAIClient(openai.url, "m", max_retries=3, max_workers=1, sleep=slept.append)
    out = serial.generate_many([_msgs(), _msgs()])
    assert out[0] is None and "cat" in out[1] and "503" not in serial.errors[0] and "500" in serial.errors[0]


def test_openai_client_runs_concurrently(openai: OpenAIServer) -> None:
    openai.delay = 0.15
    client = OpenAIClient(openai.url, "m", max_workers=4)
    start = time.monotonic()
    out = client.generate_many([_msgs(f"Example 1: the <<{w}>>\n\nWhat?") for w in KEYWORDS * 2])
    elapsed = time.monotonic() - start
    assert [parse_explanation(o) for o in out] == [f'the word "{w}"' for w in KEYWORDS * 2]  # order kept
    assert 2 <= openai.max_inflight <= 4
    assert elapsed < 8 * 0.15


def test_openai_client_rate_limit(openai: OpenAIServer) -> None:
    client = OpenAIClient(openai.url, "m", max_workers=4, requests_per_second=25)
    client.generate_many([_msgs()] * 6)
    gaps = [b - a for a, b in zip(openai.arrivals, openai.arrivals[1:])]
    assert openai.arrivals[-1] - openai.arrivals[0] >= 5 / 25 * 0.9 and min(gaps) > 0.02


# ---- explain and score -----------------------------------------------------------------------
def test_pipeline_with_openai_server_recovers_keywords(word_cache, openai: OpenAIServer, tmp_path: Path) -> None:
    client = OpenAIClient(openai.url, "m", max_workers=4)
    openai.fail_next(2, 429)  # transient failures are retried transparently
    expl = explain_latents(word_cache, range(4), client, tmp_path,
                           example_kwargs=dict(window=8, n_explain=8, n_score=10, n_nonactivating=10))
    assert [e.text for e in expl] == [f'the word "{w}"' for w in KEYWORDS]
    results = score_latents(load_explanations(tmp_path), client, tmp_path, word_tokenizer(), cache=word_cache)
    for name in ("detection", "fuzzing"):
        for r in results[name]:
            m = r.metrics
            assert m["n"] == len(r.samples) >= 18 and m["n_failed"] == 0
            assert m["balanced_accuracy"] >= 0.9 and m["auroc"] is not None and m["auroc"] >= 0.9, (name, m)
    # a wrong explanation scores at chance or worse
    wrong = DetectionScorer(client, word_tokenizer()).score('the word "river"', expl[0].examples).metrics
    assert wrong["balanced_accuracy"] < results["detection"][0].metrics["balanced_accuracy"] - 0.25
    det = json.loads((tmp_path / "scores" / "detection" / "0.json").read_text())
    assert det["explanation"] == 'the word "cat"' and {s["label"] for s in det["samples"]} == {0, 1}
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["latent"] for r in rows] == ["0", "1", "2", "3"] and float(rows[0]["detection_balanced_accuracy"]) >= 0.9
    assert int(rows[0]["count"]) == int(word_cache.stats["count"][0])
    assert (tmp_path / "scores_hist.png").stat().st_size > 1000
    # scoring used exactly the held-out windows saved with the explanation, none the explainer saw
    saved = expl[0].examples
    shown = {e.span for e in saved.explain}
    scored = {tuple(s["span"]) for s in det["samples"]}
    assert scored == {e.span for e in saved.score_activating + saved.score_nonactivating} and not shown & scored


def test_batched_scoring_prompts_parse_lists(word_cache, openai: OpenAIServer) -> None:
    client = OpenAIClient(openai.url, "m")
    ex = sample_examples(word_cache, 1, window=8, n_explain=4, n_score=10, n_nonactivating=10)
    r = FuzzingScorer(client, word_tokenizer(), n_per_prompt=5).score('the word "dog"', ex)
    assert len(openai.requests) == 4 and r.metrics["n_failed"] == 0 and r.metrics["balanced_accuracy"] >= 0.9
    assert r.metrics["auroc"] is None  # no probabilities for batched prompts


def test_transformers_client_runs_the_pipeline(word_cache, tmp_path: Path) -> None:
    """A local model as explainer and scorer (a tiny random one: gibberish, but every step runs)."""
    tok = word_tokenizer()
    client = TransformersClient(tiny_model("llama"), tok, max_new_tokens=6)
    ex = sample_examples(word_cache, 0, window=8, n_explain=4, n_score=4, n_nonactivating=4)
    e = Explainer(client, tok).explain(ex)
    assert isinstance(e.text, str) and e.raw is not None
    probs = client.choice_probs(_msgs(), ["cat", "dog"])
    assert probs is not None and sum(probs) == pytest.approx(1.0)
    r = DetectionScorer(client, tok).score(e)
    assert r.metrics["n"] == 8 and r.metrics["n_failed"] == 0 and r.metrics["auroc"] is not None


@pytest.mark.skipif(not (Path(__file__).resolve().parent.parent / "intervene/assets/quirky-tiny/model.safetensors")
                    .is_file(), reason="demo model not built")
def test_demo_model_explains_and_scores(tmp_path: Path) -> None:
    from intervene.cli import main
    from intervene.features.sae import DEMO_SAE_DIR

    sae = "demo" if (DEMO_SAE_DIR / "cfg.json").is_file() else None
    if sae is None:
        pytest.skip("demo SAE not built")
    assert main(["features", "cache", "demo", sae, "--tokens", "1024", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert main(["features", "explain", str(tmp_path / "c"), "--client", "local:demo", "--latents", "0-2",
                 "--n-explain", "5", "--n-score", "4", "--n-nonactivating", "4", "--max-new-tokens", "8",
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["features", "score", str(tmp_path / "c"), "--client", "local:demo", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "summary.csv").is_file()


def test_cli_end_to_end_with_local_model_and_openai_server(tmp_path: Path, openai: OpenAIServer,
                                                           capsys: pytest.CaptureFixture) -> None:
    from intervene.cli import main
    from intervene.features import save_sae

    model_dir, sae_dir = tmp_path / "model", tmp_path / "sae"
    tiny_model("llama").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    save_sae(rand_sae("topk", site="layers.1"), sae_dir)
    (tmp_path / "corpus.txt").write_text("\n".join(corpus(120)))
    c, a = str(tmp_path / "cache"), str(tmp_path / "auto")
    assert main(["features", "cache", str(model_dir), str(sae_dir), "--corpus", str(tmp_path / "corpus.txt"),
                 "--tokens", "600", "--ctx-len", "32", "--out", c, "--quiet"]) == 0
    assert "cached 576 tokens x 48 latents at layers.1" in capsys.readouterr().out
    assert main(["features", "explain", c, "--client", f"openai:{openai.url}", "--client-model", "m",
                 "--latents", "0-3", "--window", "8", "--n-explain", "5", "--n-score", "6", "--out", a]) == 0
    assert main(["features", "score", c, "--client", f"openai:{openai.url}", "--client-model", "m",
                 "--scorers", "detection", "--out", a]) == 0
    out = capsys.readouterr().out
    assert "detection: mean balanced accuracy" in out
    assert len(list(csv.DictReader((Path(a) / "summary.csv").open()))) >= 1
    assert main(["features", "cache", str(model_dir), str(sae_dir), "--tokens", "100", "--out", c]) == 1
    assert "--corpus FILE is required" in capsys.readouterr().err
