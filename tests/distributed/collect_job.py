"""One job of tests/test_distributed.py, run alone (``python``) or under ``torchrun --nproc_per_node N``.

    python -m tests.distributed.collect_job OUT [--cache DIR] [--positions last|all] [--die-after K]

Collects the demo model's activations of 48 quirky prompts (batch 8) at every block and a heads site and
saves them (rank 0) to OUT as safetensors. ``--die-after K`` makes the last rank exit hard after K forward
calls, as a killed worker would.
"""

from __future__ import annotations

import argparse
import os

import torch
from safetensors.torch import save_file

import intervene as iv
from intervene.activations.distributed import ranks
from intervene.data.quirky import quirky_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--positions", default="last")
    ap.add_argument("--die-after", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # every process on one thread: the same kernels, the same bits
    model, tok = iv.demo_model()
    group = ranks()
    if args.die_after and group.rank == group.world - 1:
        # Die inside collect's batch loop without touching the model (a hook would change the cache key).
        import intervene.activations.extract as extract

        run, calls = extract._Capture.run, [0]

        def dying_run(self, *a, **k):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] > args.die_after:
                os._exit(3)
            return run(self, *a, **k)

        extract._Capture.run = dying_run
    import intervene.activations.extract as extract

    forwards, counted = [0], extract._Capture.run

    def counting_run(self, *a, **k):  # type: ignore[no-untyped-def]
        forwards[0] += 1
        return counted(self, *a, **k)

    extract._Capture.run = counting_run
    rows = quirky_dataset("addition", split="test", n=24, seed=0)
    acts = iv.collect(model, tok, rows, sites=["layers.*", "layers.2.heads"], positions=args.positions,
                      batch_size=8, cache_dir=args.cache, progress=False)
    with open(f"{args.out}.forwards-{group.rank}", "w") as f:  # how many batches this rank ran
        f.write(str(forwards[0]))
    if group.main:
        out = {s: acts[s].contiguous() for s in acts.sites}
        if args.positions == "all":
            out["offsets"] = acts.offsets
        save_file(out, args.out)


if __name__ == "__main__":
    main()
