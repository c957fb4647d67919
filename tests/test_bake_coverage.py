"""Bake coverage over transformers' causal-LM types (see tests/bake_coverage.py and docs/bake_coverage.md).

Every kind that bakes must match the hooked model after save_pretrained + vanilla from_pretrained
(within 1e-4, fp32); every kind that does not must refuse with NotBakeableError. Floors are the
measured counts (transformers 5.25); a handful of families are pinned by hand.
"""

from __future__ import annotations

import time

import transformers as T

from tests.bake_coverage import KINDS, run_all

# measured: of 157 decoder-only types that build, all five kinds bake on 35, heads (ITI) on 94,
# layers.{i} on 43, the embedding on 137 (33 / 86 / 38 / 138 before residual chains; RWKV, now built with
# its residual rescaled between blocks as real checkpoints are, refuses to bake at all)
FLOORS = {"all": 35, "heads": 94, "block": 43, "embed": 137}
PINNED = {  # model_type -> kinds that bake (hand-checked against each config's bias flags)
    "llama": set(KINDS), "cohere": set(KINDS), "starcoder2": set(KINDS), "granite": set(KINDS),
    "minicpm3": set(KINDS),  # residual multipliers and scale_emb
    "gemma2": {"heads", "embed"}, "olmo2": {"heads", "embed"}, "olmo3": {"heads", "embed"},  # post-norms
    "gemma3": {"heads", "embed"},  # the flag lives in text_config
    "mistral": {"embed"}, "stablelm": {"embed"},  # no flag creates an o_proj / down_proj bias
    "olmoe": {"attn", "heads", "embed"},  # MoE experts hold no bias
    "openai-gpt": {"attn", "mlp", "heads", "embed"},  # post-LN: the residual after a block is a norm's output
    "bloom": {"block", "attn", "mlp", "heads"},  # a LayerNorm right after the embedding
    # followed step by step (intervene/sites/chain.py)
    "doge": set(KINDS),  # per-channel residual gains: a constant after the block is divided by the MLP's
    "falcon_h1": set(KINDS),  # Mamba beside attention: a third writer, before the MLP
    "mamba": {"block", "attn", "embed"},  # one writer (the mixer): no MLP, no heads
    "gemma4_text": {"heads"},  # post-norms; the per-layer-input branch after the MLP; embeddings feed it too
}


def test_bake_coverage_over_causal_lm_types(capsys) -> None:
    T.logging.set_verbosity_error()
    T.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    results = [r for r in run_all() if r.status in ("checked", "wrong")]
    seconds = time.perf_counter() - t0
    counts = {"all": sum(len(r.exact) == len(KINDS) for r in results),
              **{k: sum(k in r.exact for r in results) for k in KINDS}}
    with capsys.disabled():
        print(f"\nbake coverage over {len(results)} types ({seconds:.0f} s): " +
              ", ".join(f"{k} {v}" for k, v in counts.items()))
    wrong = [f"{r.model_type}: {r.reason}" for r in results if r.status == "wrong"]
    assert not wrong, "baked model differs from the hooked one:\n" + "\n".join(wrong)
    assert all(counts[k] >= v for k, v in FLOORS.items()), counts
    by_type = {r.model_type: r for r in results}
    for mtype, kinds in PINNED.items():
        r = by_type[mtype]
        assert set(r.exact) == kinds, f"{mtype}: bakes {sorted(r.exact)}, expected {sorted(kinds)}: {r.refused}"
        assert all(why for why in r.refused.values())
