"""Data-parallel ``collect``: 2 ranks (``torchrun --nproc_per_node 2``, gloo) against 1 process on the same data.

    python benchmarks/collect_distributed.py            # a 12-layer 512-wide random Llama, 256 texts x 64 tokens
    python benchmarks/collect_distributed.py --quick

Each side runs in fresh processes with one thread per process (the 2-rank run uses both cores, the single
process one of them: the point of data parallelism is to use more hardware). The two results are checked equal
bit for bit; the timing is the collect call alone (model build and process start excluded), median of
``--repeats`` interleaved runs. Prints seconds and the speed-up; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

JOB = r"""
import json, sys, time, torch, transformers as T
import intervene as iv
from intervene.activations.distributed import ranks
torch.set_num_threads(1)
layers, width, n, seq = map(int, sys.argv[2:6])
cfg = T.LlamaConfig(vocab_size=1000, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                    num_attention_heads=8, num_key_value_heads=8)
torch.manual_seed(0)
model = T.AutoModelForCausalLM.from_config(cfg).eval()
class Tok:
    padding_side = "right"; pad_token_id = 0; is_fast = False
    def __call__(self, texts, **kw):
        ids = [[1 + int(w[1:]) % 999 for w in t.split()][:seq] for t in texts]  # deterministic across processes
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
texts = [" ".join(f"w{(i * 13 + j) % 997}" for j in range(seq)) for i in range(n)]
group = ranks()
t = time.perf_counter()
acts = iv.collect(model, Tok(), texts, sites="layers.*", positions="last", batch_size=16, progress=False)
elapsed = time.perf_counter() - t
if group.main:
    from safetensors.torch import save_file
    save_file({s: acts[s].contiguous() for s in acts.sites}, sys.argv[1] + ".st")
    print("RESULT " + json.dumps({"seconds": elapsed, "world": group.world}))
"""


def run(ranks: int, out: Path, shape: list[str]) -> float:
    script = out.parent / "job.py"
    script.write_text(JOB)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)] if ranks > 1
              else [sys.executable])
    proc = subprocess.run([*launch, str(script), str(out), *shape], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(proc.stderr[-3000:])
    return float(json.loads(line[len("RESULT "):])["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shape = ["4", "256", "96", "32"] if args.quick else ["12", "512", "256", "64"]
    import torch
    from safetensors.torch import load_file

    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.repeats):
            for ranks in (1, 2):
                times[ranks].append(run(ranks, Path(d) / f"r{ranks}", shape))
        a, b = load_file(str(Path(d) / "r1.st")), load_file(str(Path(d) / "r2.st"))
        same = all(torch.equal(a[k], b[k]) for k in a)
    one, two = (sorted(v)[len(v) // 2] for v in (times[1], times[2]))
    print(f"load average {os.getloadavg()[0]:.1f}; Llama {shape[0]} layers x {shape[1]} wide, {shape[2]} texts x "
          f"{shape[3]} tokens, every block's last-token activation")
    print(f"  1 process:  {one:.2f} s (median of {args.repeats})")
    print(f"  2 ranks:    {two:.2f} s -> speed-up x{one / two:.2f} (ideal 2.0 on 2 free cores); results identical: {same}")


if __name__ == "__main__":
    main()
