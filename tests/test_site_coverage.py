"""Coverage of automatic site discovery over transformers' own causal-LM types (see tests/site_coverage.py).

Prints the coverage and every type that still refuses, with the reason; fails if exact coverage drops
below the measured floor or if any type resolves but fails a check (a wrong answer is worse than a
refusal). Budget: the whole sweep must stay well under 150 s on 2 CPU cores.
"""

from __future__ import annotations

import time

import transformers as T

from tests.site_coverage import run_all, summary

# Measured with transformers 5.25: 132 of the 157 decoder-only types that build tiny resolve exactly.
FLOOR_EXACT = 132
FLOOR_RATIO = 0.83
BUDGET_S = 150


def test_site_coverage_over_causal_lm_types(capsys) -> None:
    T.logging.set_verbosity_error()
    t0 = time.perf_counter()
    results = run_all()
    seconds = time.perf_counter() - t0
    exact, total = summary(results)
    with capsys.disabled():
        print(f"\nsite coverage: {exact}/{total} decoder-only buildable types exact ({100 * exact / total:.1f}%), "
              f"{seconds:.0f} s")
        for r in results:
            if r.status in ("refused", "wrong"):
                print(f"  {r.status:8s} {r.model_type}: {r.reason[:300]}")
    wrong = [f"{r.model_type}: {r.reason}" for r in results if r.status == "wrong"]
    assert not wrong, "resolved but failing a check:\n" + "\n".join(wrong)
    assert exact >= FLOOR_EXACT and exact / total >= FLOOR_RATIO, f"coverage fell to {exact}/{total}"
    assert seconds < BUDGET_S, f"the sweep took {seconds:.0f} s (budget {BUDGET_S} s)"
