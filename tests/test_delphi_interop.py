"""delphi interop against delphi itself (installed from PyPI): the same SAE and tokens cached by delphi's own
LatentCache and by ours give the same (row, position, latent) entries through our exporter and importer; delphi's
loader and scorers run on our exported cache; our scorers run on delphi's cache; our fuzzing threshold marks the
tokens delphi's highlighting marks."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest
import torch

from intervene.features import (
    DetectionScorer,
    LatentCache,
    cache_latents,
    export_delphi,
    import_delphi,
    sample_examples,
)
from intervene.features.clients import Client
from intervene.features.examples import Example
from intervene.features.score import highlighted
from tests.peers import delphi_without_vllm, need
from tests.test_latent_cache import random_tokens
from tests.test_sae import rand_sae
from tests.tiny_models import VOCAB, tiny_model

MODULE = "model.layers.1"  # delphi names hookpoints by module path


@functools.cache
def id_tokenizer():
    """One word per token id (delphi decodes every id of the cache)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="t1", pad_token="t0", eos_token="t2")


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> tuple[LatentCache, Path]:
    need("delphi")
    delphi_without_vllm()
    from delphi.config import CacheConfig
    from delphi.latents.cache import LatentCache as DelphiCache

    model, sae, tokens = tiny_model("llama"), rand_sae("topk", site="layers.1"), random_tokens(16)
    root = tmp_path_factory.mktemp("delphi")
    ours = cache_latents(model, sae, tokens, root / "ours", batch_size=4, shard_width=10, progress=False)

    def encode(x: torch.Tensor) -> torch.Tensor:  # the SAE by hand: relu, top-k
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        vals, idx = torch.relu(pre).topk(sae.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    theirs = DelphiCache(model, {MODULE: encode}, batch_size=4)
    theirs.run(tokens.numel(), tokens.long())
    theirs.save_splits(n_splits=3, save_dir=root / "delphi")
    theirs.save_config(root / "delphi", CacheConfig(cache_ctx_len=16, n_tokens=tokens.numel(), n_splits=3), "tiny")
    return ours, root


def delphi_entries(raw: Path) -> dict[tuple[int, int, int], float]:
    """Every entry as delphi's own loader (TensorBuffer) reads it."""
    from delphi.latents.loader import TensorBuffer

    out = {}
    for f in sorted((raw / MODULE).glob("*.safetensors")):
        loc, act, tokens = TensorBuffer(str(f), MODULE).load()
        assert tokens is not None and tokens.shape == (16, 16)
        out.update({tuple(r): float(a) for r, a in zip(loc.tolist(), act.tolist())})
    return out


def test_export_equals_delphis_own_cache(caches) -> None:
    ours, root = caches
    export_delphi(ours, root / "exported", module=MODULE, n_splits=3, progress=False)
    assert sorted(p.name for p in (root / "exported" / MODULE).iterdir()) == \
        sorted(p.name for p in (root / "delphi" / MODULE).iterdir())
    got, want = delphi_entries(root / "exported"), delphi_entries(root / "delphi")
    assert got.keys() == want.keys() and len(want) > 100
    assert max(abs(got[k] - want[k]) for k in want) <= 1e-3 * max(abs(v) for v in want.values())


def test_import_of_delphis_cache_equals_ours(caches) -> None:
    ours, root = caches
    imported = import_delphi(root / "delphi", MODULE, root / "imported", d_sae=ours.n_latents)
    dense, ref = imported.dense(), ours.dense()
    ref = torch.where(ref.abs() > 1e-5, ref, torch.zeros_like(ref))  # delphi keeps |a| > 1e-5
    assert torch.equal(dense != 0, ref != 0)
    torch.testing.assert_close(dense, ref, rtol=1e-3, atol=1e-3)  # float16 in delphi's files
    assert torch.equal(imported.tokens, ours.tokens)
    counts = (ref != 0).sum(0)
    assert torch.equal(imported.stats["count"], counts)


class _Answers:
    """A delphi client answering every prompt with ``[1, 1, ...]`` (delphi's own Client interface)."""

    def __init__(self, n: int) -> None:
        from delphi.clients.client import Client as DelphiClient
        from delphi.clients.client import Response

        class _C(DelphiClient):
            async def generate(self, prompt, **kw):
                return Response(text=str([1] * n))

        self.client = _C("stub")


def test_delphis_loader_and_scorers_run_on_our_export(caches) -> None:
    ours, root = caches
    export_delphi(ours, root / "for_delphi", module=MODULE, n_splits=2, progress=False)
    from delphi.config import ConstructorConfig, SamplerConfig
    from delphi.latents import LatentDataset
    from delphi.scorers import DetectionScorer as DDetection
    from delphi.scorers import FuzzingScorer as DFuzzing

    # latents rare enough that delphi finds silent 4-token windows for them (this random SAE has few)
    counts = ours.stats["count"]
    live = [i for i in range(ours.n_latents) if 3 <= int(counts[i]) <= 12][:2]
    assert len(live) == 2
    ds = LatentDataset(str(root / "for_delphi"), SamplerConfig(n_examples_train=1, n_examples_test=2, n_quantiles=1),
                       ConstructorConfig(example_ctx_len=4, min_examples=3, n_non_activating=4,
                                         non_activating_source="random"),
                       tokenizer=id_tokenizer(), modules=[MODULE], latents={MODULE: torch.tensor(live)})
    records = list(ds)
    assert sorted(r.latent.latent_index for r in records) == sorted(live)
    for rec in records:
        top = float(max(e.activations.max() for e in rec.examples))
        assert top == pytest.approx(float(ours.stats["max"][rec.latent.latent_index]), rel=1e-3)
        rec.explanation = "anything"
        for scorer in (DDetection(_Answers(1).client, n_examples_shown=1),
                       DFuzzing(_Answers(1).client, n_examples_shown=1)):
            result = asyncio.run(scorer(rec))
            assert result.score and all(o.prediction is True for o in result.score)


class _Yes(Client):
    def generate(self, messages, max_tokens: int = 256) -> str:
        return "1"


def test_our_scorers_run_on_delphis_cache(caches) -> None:
    ours, root = caches
    imported = import_delphi(root / "delphi", MODULE, root / "imported2", d_sae=ours.n_latents)
    counts = imported.stats["count"]
    latent = next(i for i in range(imported.n_latents) if 3 <= int(counts[i]) <= 12)  # leaves silent windows
    ex = sample_examples(imported, latent, window=4, n_explain=1, n_score=2, n_nonactivating=4)
    assert ex.score_activating and len(ex.score_nonactivating) == 4
    r = DetectionScorer(_Yes(), id_tokenizer()).score("anything", ex)
    assert r.metrics["n"] == len(ex.score_activating) + 4 and r.metrics["recall"] == 1.0
    assert r.metrics["tn"] == 0 and r.metrics["fp"] == 4


def test_fuzzing_threshold_marks_what_delphi_marks(caches) -> None:
    need("delphi")
    from delphi.latents.latents import ActivatingExample
    from delphi.scorers.classifier.sample import _prepare_text

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        acts = torch.relu(torch.randn(12, generator=g)) * (torch.rand(12, generator=g) < 0.5)
        if acts.max() == 0:
            continue
        strs = [f" w{i:02d}" for i in range(12)]  # no token a prefix of another
        ex = ActivatingExample(tokens=torch.arange(12), activations=acts, str_tokens=strs, quantile=1)
        text, _ = _prepare_text(ex, n_incorrect=0, threshold=0.3, highlighted=True)
        marked_by_delphi = [f"w{i:02d}" in "".join(p.split(">>")[0] for p in text.split("<<")[1:]) for i in range(12)]
        ours = highlighted(Example(0, 0, list(range(12)), acts.tolist(), "activating"), 0.3)
        assert ours == marked_by_delphi, trial
