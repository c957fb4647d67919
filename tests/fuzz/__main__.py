"""``python -m tests.fuzz --cases N [--seed S] [--start I] [--keep DIR]``: run the fuzz suite and print the report.

Exits 1 when any case fails. ``--keep`` leaves failing cases (and the seeds) in DIR for inspection; a case is
reproduced by running with the same ``--seed`` and ``--start`` set to its index with ``--cases 1``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from tests.fuzz.harness import report, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="master seed (cases are deterministic given it)")
    parser.add_argument("--start", type=int, default=0, help="index of the first case")
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep failing cases in")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # version 1 files warn by design; the report is what matters
    t0 = time.perf_counter()
    results = run(args.cases, args.seed, work=args.keep, keep=args.keep is not None, progress=True, start=args.start)
    print(report(results))
    print(f"{len(results)} cases in {time.perf_counter() - t0:.1f}s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
