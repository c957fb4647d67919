"""Time to fit every probe type on all layers at once, and batched LR vs a per-layer scikit-learn loop.

Synthetic activations of a 12-layer, 768-wide model: 5,000 contrast pairs per layer with a planted
truth direction (``intervene.probes.synthetic``). Supervised probes see the positive side with
labels; CCS/CRC see the pairs. Logistic regression is also timed on *anisotropic* features (a
power-law spectrum with a few massive dimensions, like real residual streams), where first-order
solvers slow down. A last section times ITI's shape (one probe per attention head,
``[heads, 4000, 128]``) against honest_llama's per-head scikit-learn loop.

In each of the three regimes, ``LogisticRegressionProbe()`` (``solver="auto"``) and scikit-learn's
``LogisticRegression(C=1)`` loop are run alternately ``--repeat`` times and the medians compared:
wall time (ours on torch's threads), CPU time (all threads), and ours pinned to one thread — scikit-learn's
lbfgs runs with its BLAS limited to one thread (``threadpoolctl``), its fastest setting for these sizes
on shared cores (its default multi-threaded BLAS made it 5-100x slower here).

Measured on 2 shared cores (AMD EPYC; load average 2.8-4.2, other jobs held about one core, so the
2-thread runs got about one: their CPU time is their wall time), medians of 3, wall / CPU seconds:

    regime [B, N, D]              auto  ours, 2 threads  ours, 1 thread  sklearn, 1 thread  wall  CPU  1 thread (CPU)
    isotropic [12, 5000, 768]     pcg    0.79 / 0.80      0.69 / 0.65     1.79 / 1.32       2.3x  1.6x   2.0x
    anisotropic [12, 5000, 768]   pcg    1.91 / 1.79      1.80 / 1.58    21.9  / 18.5      11.5x 10.4x  11.7x
    ITI heads [64, 4000, 128]     pcg    0.41 / 0.37      0.35 / 0.29     0.56 / 0.43       1.4x  1.2x   1.5x

On an idle machine (load average 1.0-1.1), same medians: isotropic 0.46 / 0.87 (2 threads), 0.74 (1 thread) against
scikit-learn's 0.72: 1.6x wall, 1.0x at one thread each; anisotropic 0.83 / 1.58, 1.49 against 16.2: 10.9x at one
thread each; ITI heads 0.20 / 0.34, 0.27 against 0.39: 1.5x at one thread each. (ITI itself fits its head probes
with ``fit_head_probes``, see ``benchmarks/iti_probe_fit.py``; this section times the general probe on that shape.)

Before this solver family (auto = Newton; the same comparison at load ~7): isotropic 0.15x CPU time
(0.36x at one thread each), anisotropic 3.2x (7.7x), ITI heads 0.06x (0.37x).

    python benchmarks/probe_fit.py                 # full size (a few minutes on 2 shared cores)
    python benchmarks/probe_fit.py --quick         # smaller, for a smoke run
    python benchmarks/probe_fit.py --threads 1     # pin torch and BLAS threads
    python benchmarks/probe_fit.py --compare-only  # only the three comparisons with scikit-learn

Prints seconds and ratios; asserts nothing. On a shared machine, read the load average first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from intervene import probes
from intervene.probes.lr import auto_solver
from intervene.probes.synthetic import anisotropic, planted_features, planted_pairs


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU (all threads of this process) seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).abs()


def _row(name: str, seconds: float, layers: int, note: str) -> None:
    print(f"  {name:<40} {seconds:8.2f} s  ({seconds / layers:6.3f} s/layer; {note})")


def _objective(
    x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor | float
) -> float:
    """scikit-learn's objective with C=1, per sample: ``mean log-loss + |w|^2 / (2 N)`` (float64)."""
    z = x.double() @ coef.double() + float(intercept)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y.double())
    return float(loss + 0.5 * (coef.double() ** 2).sum() / x.shape[0])


def _sklearn_loop(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[list[torch.Tensor], list[float], list[int]]:
    """scikit-learn's LogisticRegression(C=1) on the first ``k`` problems of ``x`` [B, N, D], one BLAS
    thread: coefficients, intercepts and iterations."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    coefs, icpts, iters = [], [], []
    with threadpool_limits(1):
        for i in range(k):
            model = LogisticRegression(C=1.0, max_iter=5000).fit(x[i].numpy(), y.numpy())
            coefs.append(torch.as_tensor(model.coef_[0]))
            icpts.append(float(model.intercept_[0]))
            iters.append(int(model.n_iter_[0]))
    return coefs, icpts, iters


def _pinned(threads: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def compare_sklearn(label: str, x: torch.Tensor, y: torch.Tensor, k: int, repeat: int) -> None:
    """Batched ``LogisticRegressionProbe()`` on all of ``x`` [B, N, D] vs scikit-learn's loop on ``k`` of
    the ``B`` problems (scaled to ``B``), alternating, ``repeat`` times; prints medians and ratios."""
    b, n, d = x.shape
    k = min(k, b)
    threads = torch.get_num_threads()
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "ours1": [], "sklearn": []}
    probe = probes.LogisticRegressionProbe(C=1.0)
    fits: list[tuple[list[torch.Tensor], list[float], list[int]]] = []
    for _ in range(repeat):
        times["ours"].append(_timed(lambda: probe.fit(x, y)))
        times["ours1"].append(_timed(_pinned(1, lambda: probe.fit(x, y))))
        wall, cpu = _timed(lambda: fits.append(_sklearn_loop(x, y, k)))
        times["sklearn"].append((wall * b / k, cpu * b / k))
    med = {name: tuple(statistics.median(t[i] for t in v) for i in (0, 1)) for name, v in times.items()}
    coefs, icpts, iters = fits[-1]
    agree = min(float(_cos(c, probe.coef_[i])) for i, c in enumerate(coefs))
    ours_obj = _objective(x[0], y, probe.coef_[0], probe.intercept_[0])
    sk_obj = _objective(x[0], y, coefs[0], icpts[0])
    (ow, oc), (o1w, o1c), (sw, sc) = med["ours"], med["ours1"], med["sklearn"]
    print(f"  {label}: medians of {repeat}, [{b}, {n}, {d}], auto -> {auto_solver(d)}")
    print(f"    ours, {threads} thread(s): {ow:7.2f} s wall, {oc:7.2f} s CPU ({probe.n_iter_} iterations, "
          f"objective (problem 0) {ours_obj:.6f})")
    print(f"    ours, 1 thread    : {o1w:7.2f} s wall, {o1c:7.2f} s CPU")
    print(f"    sklearn, 1 thread : {sw:7.2f} s wall, {sc:7.2f} s CPU (timed {k} of {b}, scaled; "
          f"{max(iters)} lbfgs iterations, objective {sk_obj:.6f}; coef cosine to ours >= {agree:.5f})")
    print(f"    ours vs sklearn   : {sw / ow:5.1f}x wall, {sc / oc:5.1f}x CPU time; at 1 thread each "
          f"{sw / o1w:5.1f}x wall, {sc / o1c:5.1f}x CPU time")


def bench_layers(layers: int, n: int, d: int, restarts: int, sk_layers: int, sk_aniso: int, repeat: int,
                 compare_only: bool = False) -> None:
    print(f"\n== all layers at once: [{layers}, {n}, {d}] ({n} pairs per layer), isotropic features ==")
    x, y, dir_sup = planted_features(n, d, batch=(layers,), margin=2.0, noise=1.0, seed=1)
    if compare_only:
        if sk_layers > 0:
            compare_sklearn("isotropic", x, y, sk_layers, repeat)
        if sk_aniso > 0:
            print(f"\n== logistic regression on anisotropic features: [{layers}, {n}, {d}] ==")
            compare_sklearn("anisotropic", anisotropic(x), y, sk_aniso, repeat)
        return
    x_pos, x_neg, _, direction = planted_pairs(n, d, batch=(layers,), margin=3.0, noise=1.0, seed=0)
    supervised = {
        f"LogisticRegression (auto: {auto_solver(d)})": probes.LogisticRegressionProbe(C=1.0),
        "LogisticRegression (PCG)": probes.LogisticRegressionProbe(C=1.0, solver="pcg"),
        "LogisticRegression (Newton)": probes.LogisticRegressionProbe(C=1.0, solver="newton"),
        "LogisticRegression (L-BFGS)": probes.LogisticRegressionProbe(C=1.0, solver="lbfgs"),
        "MeanDiff": probes.MeanDiffProbe(),
        "LDA (Ledoit-Wolf)": probes.LDAProbe(),
    }
    for name, probe in supervised.items():
        seconds = _timed(lambda probe=probe: probe.fit(x, y))[0]
        note = f"min |cos| to planted {float(_cos(probe.direction_, dir_sup).min()):.3f}"
        if isinstance(probe, probes.LogisticRegressionProbe):
            note += f", {probe.n_iter_} iterations"
        _row(name, seconds, layers, note)
    unsupervised = {
        f"CCS ({restarts} restarts, batched L-BFGS)": probes.CCSProbe(n_restarts=restarts),
        "CRC (VINC eigen)": probes.CRCProbe(method="vinc"),
        "CRC (PCA of pair diffs)": probes.CRCProbe(method="pca"),
    }
    for name, probe in unsupervised.items():
        seconds = _timed(lambda probe=probe: probe.fit(x_pos, x_neg))[0]
        note = f"min |cos| to planted {float(_cos(probe.direction_, direction).min()):.3f}"
        if isinstance(probe, probes.CCSProbe):
            note += f", {probe.n_iter_} iterations"
        _row(name, seconds, layers, note)
    if sk_layers > 0:
        compare_sklearn("isotropic", x, y, sk_layers, repeat)

    print(f"\n== logistic regression on anisotropic features: [{layers}, {n}, {d}] ==")
    xa = anisotropic(x)
    for name, solver, k in (("PCG", "pcg", layers), ("Newton", "newton", layers), ("L-BFGS", "lbfgs", sk_aniso)):
        if k <= 0:
            continue
        probe = probes.LogisticRegressionProbe(C=1.0, solver=solver)  # type: ignore[arg-type]
        seconds = _timed(lambda probe=probe, k=k: probe.fit(xa[:k], y))[0] * layers / k
        note = f"{probe.n_iter_} iterations, converged={probe.converged_}"
        _row(f"LogisticRegression ({name})", seconds, layers, note + (f"; {k} layers timed" if k < layers else ""))
    if sk_aniso > 0:
        compare_sklearn("anisotropic", xa, y, sk_aniso, repeat)


def bench_heads(heads: int, n: int, d: int, sklearn_heads: int, repeat: int) -> None:
    print(f"\n== ITI shape: one LR per head, [{heads} heads, {n}, {d}] ==")
    x, y, _ = planted_features(n, d, batch=(heads,), margin=1.0, noise=1.0, seed=2)
    if sklearn_heads > 0:
        compare_sklearn("ITI heads", x, y, sklearn_heads, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--sklearn-layers", type=int, default=12, help="isotropic layers timed in sklearn (0: skip)")
    parser.add_argument("--sklearn-aniso", type=int, default=2,
                        help="anisotropic layers timed in sklearn and our L-BFGS (slow: ~1,300 iterations; 0: skip)")
    parser.add_argument("--heads", type=int, default=64, help="heads fitted in the ITI section (0: skip)")
    parser.add_argument("--sklearn-heads", type=int, default=64,
                        help="heads timed in sklearn (all by default: a run as long as ours times more evenly)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of ours and sklearn (medians)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compare-only", action="store_true",
                        help="only the LogisticRegressionProbe vs scikit-learn comparisons (no other probes/solvers)")
    parser.add_argument("--quick", action="store_true", help="layers=4, n=1000, d=256, heads=16, repeat=1")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.n, args.d, args.heads, args.sklearn_layers, args.sklearn_heads, args.repeat = (
            4, 1000, 256, 16, 4, 4, 1)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {load[0]:.1f}")
    bench_layers(args.layers, args.n, args.d, args.restarts, args.sklearn_layers, args.sklearn_aniso, args.repeat,
                 args.compare_only)
    if args.heads > 0:
        bench_heads(args.heads, 4000 if not args.quick else 1000, 128, args.sklearn_heads, args.repeat)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nload average at the end {load[0]:.1f}")


if __name__ == "__main__":
    main()
