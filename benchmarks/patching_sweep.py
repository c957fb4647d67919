"""A full block x position activation-patching sweep: intervene's batched sweep against pyvene 0.1.8's per-cell
loop on the same model and pairs (and against our own per-cell loop), plus attribution patching's cost in
forward passes.

    python benchmarks/patching_sweep.py            # GPT-2 shape, 6 layers x 256 wide, 16 pairs x 16 tokens
    python benchmarks/patching_sweep.py --quick    # smaller, for a smoke run

pyvene has no batched sweep: its natural form is one IntervenableModel per layer and one call per position,
each call running the source and the base forward. Both sides run on the same thread count; results are
checked equal cell by cell (max |Δ| printed). The three sweeps run interleaved ``--repeats`` times and the
medians are compared, so load on a shared machine falls on every side alike. Prints seconds and ratios;
asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time

import torch
import transformers as T

from intervene.methods.patching import attribution_patching, interchange, logit_diff, sweep


def build(layers: int, width: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    cfg = T.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=8, n_positions=128)
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def data(n: int, seq: int, vocab: int, seed: int = 1) -> tuple[dict, dict, list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, seq // 3] = torch.randint(0, vocab, (n,), generator=g)  # one token differs, like IOI's name swap
    answer = torch.randint(0, vocab, (n,), generator=g).tolist()
    wrong = torch.randint(0, vocab, (n,), generator=g).tolist()
    mask = torch.ones_like(clean)
    return {"input_ids": clean, "attention_mask": mask}, {"input_ids": corrupt, "attention_mask": mask}, answer, wrong


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def pyvene_loop(model, clean, corrupt, metric, layers: int, seq: int) -> torch.Tensor:
    import pyvene as pv

    n = clean["input_ids"].shape[0]
    out = torch.empty(layers, seq)
    for layer in range(layers):
        cfg = pv.IntervenableConfig(representations=[{"layer": layer, "component": "block_output", "unit": "pos",
                                                      "max_number_of_units": 1}],
                                    intervention_types=pv.VanillaIntervention)
        pvm = pv.IntervenableModel(cfg, model)
        for pos in range(seq):
            with torch.no_grad():
                _, cf = pvm({"input_ids": corrupt["input_ids"]}, [{"input_ids": clean["input_ids"]}],
                            {"sources->base": ([[[pos]] * n], [[[pos]] * n])})
            out[layer, pos] = metric(cf.logits[:, -1].float(), torch.arange(n)).mean()
    return out


def our_loop(model, clean, corrupt, metric, layers: int, seq: int) -> torch.Tensor:
    n = clean["input_ids"].shape[0]
    out = torch.empty(layers, seq)
    for layer in range(layers):
        for pos in range(seq):
            with torch.no_grad():
                logits = interchange(model, corrupt, clean, f"layers.{layer}", positions=[pos]).logits
            out[layer, pos] = metric(logits[:, -1].float(), torch.arange(n)).mean()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every side (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported (default 3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # pyvene logs a warning per hook
    layers, width, n, seq, vocab = (3, 128, 8, 10, 500) if args.quick else (6, 256, 16, 16, 2000)
    model = build(layers, width, vocab)
    clean, corrupt, answer, wrong = data(n, seq, vocab)
    metric = logit_diff(answer, wrong)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"GPT-2 shape: {layers} layers x {width} wide; {n} pairs x {seq} tokens; {layers * seq} cells")

    with torch.no_grad():
        model(**corrupt)  # warm-up: the first call pays one-off costs
        t_fwd = sorted(timed(lambda: model(**corrupt))[0] for _ in range(7))[3]  # median
    attribution_patching(model, clean, corrupt, metric, sites="layers.*", progress=False)  # warm-up
    pv_model = copy.deepcopy(model)  # pyvene removes every hook on a model it wraps
    runs: dict[str, list[float]] = {"ours": [], "loop": [], "pyvene": []}
    for _ in range(args.repeats):  # interleaved, so a busy moment on a shared machine hits every side alike
        t, res = timed(lambda: sweep(model, clean, corrupt, metric, sites="layers.*", batch_size=256, progress=False))
        runs["ours"].append(t)
        t, loop = timed(lambda: our_loop(model, clean, corrupt, metric, layers, seq))
        runs["loop"].append(t)
        t, theirs = timed(lambda: pyvene_loop(pv_model, clean, corrupt, metric, layers, seq))
        runs["pyvene"].append(t)
    t_ours, t_loop, t_pv = (sorted(v)[len(v) // 2] for v in (runs["ours"], runs["loop"], runs["pyvene"]))
    t_atp = sorted(timed(lambda: attribution_patching(model, clean, corrupt, metric, sites="layers.*",
                                                      progress=False))[0] for _ in range(5))[2]
    print(f"  one forward of the {n} corrupted prompts        {t_fwd * 1e3:8.1f} ms")
    print(f"  intervene sweep (batched), median               {t_ours:8.2f} s")
    print(f"  intervene per-cell loop (interchange), median   {t_loop:8.2f} s")
    print(f"  pyvene 0.1.8 per-cell loop, median              {t_pv:8.2f} s")
    print(f"  attribution patching, all cells (median of 5)   {t_atp:8.3f} s = {t_atp / t_fwd:.1f} forward-equivalents "
          "(target <= 3)")
    print(f"max |sweep - pyvene| {float((res.raw - theirs).abs().max()):.2e}, "
          f"max |sweep - our loop| {float((res.raw - loop).abs().max()):.2e}")
    print(f"speed-up of the batched sweep: {t_pv / t_ours:.1f}x over pyvene's loop (target >= 3x), "
          f"{t_loop / t_ours:.1f}x over our own loop; attribution patching {t_ours / t_atp:.0f}x faster than the sweep")


if __name__ == "__main__":
    main()
