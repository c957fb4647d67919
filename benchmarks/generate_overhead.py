"""Cost of steering `generate`: plain HF vs `Intervenable.generate` (and pyvene 0.1.8 if installed).

A random ~50M-parameter Llama on CPU, greedy, 64 new tokens, batch 1 and 8; positions "all" and
"generated". Variants are timed alternately in one run (round-robin, best-of and median over
rounds) so machine noise hits all of them alike. Prints ratios to plain HF; target <= 1.03.

    python benchmarks/generate_overhead.py [--rounds 5] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import intervene as iv


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def pyvene_runner(model, layer: int, v: torch.Tensor, on_prompt: bool):
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import pyvene as pv
    except ImportError:
        return None
    cfg = pv.IntervenableConfig(representations=[{
        "layer": layer, "component": "block_output",
        "intervention": pv.AdditionIntervention(embed_dim=v.numel(), source_representation=v)}])
    pvm = pv.IntervenableModel(cfg, model)
    pvm.disable_model_gradients()

    def run(batch, n):
        _, out = pvm.generate(base=batch, intervene_on_prompt=on_prompt, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)
        return out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    layer = 4
    v = torch.randn(512) * 0.5
    print(f"model: random Llama, {n_params:.0f}M params, {args.threads} threads; {args.new_tokens} new tokens, greedy")

    def plain(batch, n):
        return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def steered(positions):
        ivm = iv.Intervenable(model, iv.Steering({f"layers.{layer}": v}, positions=positions), attach=False)

        def run(batch, n):
            with ivm:
                return ivm.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return run

    variants = {"plain HF": plain, "intervene all": steered("all"), "intervene generated": steered("generated")}
    for name, on_prompt in (("pyvene all", True), ("pyvene generated", False)):
        r = pyvene_runner(model, layer, v, on_prompt)
        if r is not None:
            variants[name] = r
    if "pyvene all" not in variants:
        print("(pyvene not installed: pip install 'intervene[pyvene]' to compare)")

    for bsz in (1, 8):
        g = torch.Generator().manual_seed(bsz)
        batch = {"input_ids": torch.randint(1, 32000, (bsz, 16), generator=g),
                 "attention_mask": torch.ones(bsz, 16, dtype=torch.long)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():  # warm-up
            fn(batch, 4)
        for _ in range(args.rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                with torch.inference_mode():
                    fn(batch, args.new_tokens)
                times[name].append(time.perf_counter() - t0)
        base_med = statistics.median(times["plain HF"])
        base_min = min(times["plain HF"])
        print(f"\nbatch {bsz}: plain HF median {base_med:.3f}s")
        print(f"  {'variant':<22}{'median s':>10}{'ratio(median)':>15}{'ratio(best)':>13}")
        for name, ts in times.items():
            print(f"  {name:<22}{statistics.median(ts):>10.3f}{statistics.median(ts) / base_med:>15.3f}"
                  f"{min(ts) / base_min:>13.3f}")


if __name__ == "__main__":
    main()
