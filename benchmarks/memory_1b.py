"""A ~1B-parameter model, built from its config in bf16 (no download): steered ``generate`` overhead, ``collect``'s
peak memory against the model's own footprint, and that memory stays flat as the collected tokens grow 10x.

    python benchmarks/memory_1b.py            # TinyLlama-1.1B's shape: 22 layers x 2048, 32k vocabulary
    python benchmarks/memory_1b.py --quick    # a ~0.3B shape, for a smoke run

Every measurement runs in a fresh child process (``sys.executable``, not a fork), which reports its own peak
resident memory (``VmHWM`` of /proc/self/status; ``ru_maxrss`` is not used: it starts at the parent's peak,
which survives ``exec`` on Linux). Prints figures and ratios;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, tempfile, time, torch, transformers as T
import intervene as iv
def peak_rss():  # bytes: this process's own peak (VmHWM), else ru_maxrss (which may include the parent's)
    try:
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
torch.manual_seed(0)
job, shape = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(shape.pop("threads"))
cfg = T.LlamaConfig(**shape)
t0 = time.perf_counter()
model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
params = sum(p.numel() for p in model.parameters())
footprint = sum(p.numel() * p.element_size() for p in model.parameters())
built = time.perf_counter() - t0
base_rss = peak_rss()
out = {"params": params, "footprint": footprint, "build_s": built, "rss_after_build": base_rss}
ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
if job == "generate":
    kw = dict(max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    steer = iv.Steering({"layers.8": torch.randn(cfg.hidden_size)}, scale=2.0, positions="generated")
    with torch.no_grad():
        model.generate(input_ids=ids, **kw)  # warm-up
        times = {"plain": [], "steered": []}
        for _ in range(3):  # interleaved: a busy moment hits both
            t = time.perf_counter(); model.generate(input_ids=ids, **kw); times["plain"].append(time.perf_counter() - t)
            with iv.Intervenable(model, [steer]) as ivm:
                t = time.perf_counter(); ivm.generate(input_ids=ids, **kw); times["steered"].append(time.perf_counter() - t)
    out.update({k: sorted(v)[1] for k, v in times.items()})
else:
    n = int(job.split(":")[1])
    texts = [" ".join(f"w{(i * 7 + j) % 997}" for j in range(60)) for i in range(n)]
    class Tok:  # a whitespace tokenizer: the benchmark needs token counts, not a vocabulary
        padding_side = "right"; pad_token_id = 0; is_fast = False
        def __call__(self, texts, **kw):
            ids = [[1 + int(w[1:]) % (cfg.vocab_size - 1) for w in t.split()][:64] for t in texts]
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        acts = iv.collect(model, Tok(), texts, sites=["layers.4", "layers.12"], positions="all", batch_size=8,
                          cache_dir=d, dtype=torch.bfloat16, progress=False)
        out["collect_s"] = time.perf_counter() - t
        out["tokens"] = int(acts.offsets[-1]) if hasattr(acts, "offsets") else None
out["peak_rss"] = peak_rss()
print("RESULT " + json.dumps(out))
"""


def child(job: str, shape: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, job, json.dumps(shape)], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"child {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--texts", type=int, default=40, help="texts in the small collect (the large one has 10x)")
    args = ap.parse_args()
    shape = (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000) if args.quick else
             dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000))
    shape["threads"] = args.threads
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads} thread(s); every figure from a fresh child process")
    gen = child("generate", dict(shape))
    print(f"model: {gen['params'] / 1e9:.2f}B parameters, {gib(gen['footprint'])} of bf16 weights "
          f"(built from its config in {gen['build_s']:.0f} s)")
    print(f"generate 16 tokens: plain {gen['plain']:.2f} s, steered (layers.8, generated positions) "
          f"{gen['steered']:.2f} s -> overhead x{gen['steered'] / gen['plain']:.3f}")
    small = child(f"collect:{args.texts}", dict(shape))
    large = child(f"collect:{10 * args.texts}", dict(shape))
    for name, r in (("collect", small), ("collect 10x", large)):
        print(f"{name:12s} {r['tokens']:>7} tokens x 2 sites (positions='all', streamed to a cache): "
              f"peak RSS {gib(r['peak_rss'])} = {r['peak_rss'] / r['footprint']:.2f}x the weights, "
              f"{r['collect_s']:.0f} s")
    print(f"peak RSS grows x{large['peak_rss'] / small['peak_rss']:.3f} while the tokens grow "
          f"x{large['tokens'] / small['tokens']:.1f}")


if __name__ == "__main__":
    main()
