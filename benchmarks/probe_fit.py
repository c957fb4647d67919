"""Time to fit every probe type on all layers at once, and batched LR vs a per-layer sklearn loop.

Synthetic activations of a 12-layer, 768-wide model: 5,000 contrast pairs per layer with a planted
truth direction (``intervene.probes.synthetic``). Supervised probes see the positive side with
labels; CCS/CRC see the pairs. Logistic regression is also timed on *anisotropic* features (a
power-law spectrum with a few massive dimensions, like real residual streams), where first-order
solvers slow down. A last section times ITI's shape (one probe per attention head,
``[heads, 4000, 128]``) against honest_llama's per-head scikit-learn loop, on a subset of heads.

    python benchmarks/probe_fit.py                 # full size (several minutes on 2 shared cores)
    python benchmarks/probe_fit.py --quick         # smaller, for a smoke run
    python benchmarks/probe_fit.py --threads 1     # pin torch and BLAS threads

Prints seconds and ratios; asserts nothing. On a shared machine, read the load average first.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from intervene import probes
from intervene.probes.synthetic import anisotropic, planted_features, planted_pairs


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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


def _sklearn_loop(
    x: torch.Tensor, y: torch.Tensor, k: int
) -> tuple[float, list[torch.Tensor], list[int], float]:
    """scikit-learn's LogisticRegression(C=1) on the first ``k`` layers: seconds per layer, the
    coefficients, iterations, and its objective on layer 0."""
    from sklearn.linear_model import LogisticRegression

    coefs, iters = [], []
    objective = float("nan")
    start = time.perf_counter()
    for i in range(k):
        model = LogisticRegression(C=1.0, max_iter=5000).fit(x[i].numpy(), y.numpy())
        coefs.append(torch.as_tensor(model.coef_[0]))
        iters.append(int(model.n_iter_[0]))
        if i == 0:
            objective = _objective(x[0], y, coefs[0], float(model.intercept_[0]))
    return (time.perf_counter() - start) / k, coefs, iters, objective


def bench_layers(layers: int, n: int, d: int, restarts: int, sklearn_layers: int) -> None:
    print(f"\n== all layers at once: [{layers}, {n}, {d}] ({n} pairs per layer), isotropic features ==")
    x_pos, x_neg, _, direction = planted_pairs(n, d, batch=(layers,), margin=3.0, noise=1.0, seed=0)
    x, y, dir_sup = planted_features(n, d, batch=(layers,), margin=2.0, noise=1.0, seed=1)
    lr_times: dict[str, float] = {}
    lr_fits: dict[str, probes.LogisticRegressionProbe] = {}
    supervised = {
        "LogisticRegression (auto: Newton)": probes.LogisticRegressionProbe(C=1.0),
        "LogisticRegression (L-BFGS)": probes.LogisticRegressionProbe(C=1.0, solver="lbfgs"),
        "MeanDiff": probes.MeanDiffProbe(),
        "LDA (Ledoit-Wolf)": probes.LDAProbe(),
    }
    for name, probe in supervised.items():
        seconds = _timed(lambda probe=probe: probe.fit(x, y))
        note = f"min |cos| to planted {float(_cos(probe.direction_, dir_sup).min()):.3f}"
        if isinstance(probe, probes.LogisticRegressionProbe):
            lr_times[name], lr_fits[name] = seconds, probe
            note += f", {probe.n_iter_} iterations"
        _row(name, seconds, layers, note)
    unsupervised = {
        f"CCS ({restarts} restarts, batched L-BFGS)": probes.CCSProbe(n_restarts=restarts),
        "CRC (VINC eigen)": probes.CRCProbe(method="vinc"),
        "CRC (PCA of pair diffs)": probes.CRCProbe(method="pca"),
    }
    for name, probe in unsupervised.items():
        seconds = _timed(lambda probe=probe: probe.fit(x_pos, x_neg))
        note = f"min |cos| to planted {float(_cos(probe.direction_, direction).min()):.3f}"
        if isinstance(probe, probes.CCSProbe):
            note += f", {probe.n_iter_} iterations"
        _row(name, seconds, layers, note)
    if sklearn_layers > 0:
        _compare_sklearn(x, y, layers, sklearn_layers, lr_times, lr_fits)

    print(f"\n== logistic regression on anisotropic features: [{layers}, {n}, {d}] ==")
    xa = anisotropic(x)
    lr_times, lr_fits = {}, {}
    for name, solver in (
        ("LogisticRegression (auto: Newton)", "auto"),
        ("LogisticRegression (L-BFGS)", "lbfgs"),
    ):
        probe = probes.LogisticRegressionProbe(C=1.0, solver=solver)  # type: ignore[arg-type]
        seconds = _timed(lambda probe=probe: probe.fit(xa, y))
        lr_times[name], lr_fits[name] = seconds, probe
        _row(name, seconds, layers, f"{probe.n_iter_} iterations, converged={probe.converged_}")
    if sklearn_layers > 0:
        _compare_sklearn(xa, y, layers, max(1, sklearn_layers - 1), lr_times, lr_fits)


def _compare_sklearn(
    x: torch.Tensor,
    y: torch.Tensor,
    layers: int,
    k: int,
    lr_times: dict[str, float],
    lr_fits: dict[str, probes.LogisticRegressionProbe],
) -> None:
    k = min(k, layers)
    per_layer, coefs, iters, objective = _sklearn_loop(x, y, k)
    print(
        f"  sklearn LogisticRegression loop: {per_layer:.2f} s/layer (timed {k} layer(s), "
        f"{max(iters)} lbfgs iterations) -> {per_layer * layers:.1f} s for {layers} layers; "
        f"objective (layer 0) {objective:.6f}"
    )
    for name, seconds in lr_times.items():
        probe = lr_fits[name]
        agree = min(float(_cos(c, probe.coef_[i])) for i, c in enumerate(coefs))
        ours = _objective(x[0], y, probe.coef_[0], probe.intercept_[0])
        print(
            f"  {name} vs sklearn loop: {per_layer * layers / seconds:5.1f}x faster "
            f"(coef cosine >= {agree:.5f}; objective {ours:.6f})"
        )


def bench_heads(heads: int, n: int, d: int, sklearn_heads: int, total_heads: int) -> None:
    print(f"\n== ITI shape: one LR per head, [{heads} heads, {n}, {d}] ==")
    x, y, _ = planted_features(n, d, batch=(heads,), margin=1.0, noise=1.0, seed=2)
    probe = probes.LogisticRegressionProbe(C=1.0)
    seconds = _timed(lambda: probe.fit(x, y))
    per_head = seconds / heads
    print(
        f"  batched Newton: {seconds:.2f} s for {heads} heads ({per_head * 1e3:.1f} ms/head, "
        f"{probe.n_iter_} iterations) -> {per_head * total_heads:.1f} s for {total_heads} heads"
    )
    if sklearn_heads <= 0:
        return
    k = min(sklearn_heads, heads)
    sk_per_head, _, _, _ = _sklearn_loop(x, y, k)
    print(
        f"  sklearn loop (honest_llama style): {sk_per_head * 1e3:.1f} ms/head (timed {k}) -> "
        f"{sk_per_head * total_heads:.1f} s for {total_heads} heads"
    )
    print(f"  batched LR vs sklearn loop: {sk_per_head / per_head:.1f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--sklearn-layers", type=int, default=3, help="layers to time sklearn on (0: skip)")
    parser.add_argument("--heads", type=int, default=64, help="heads fitted in the ITI section (0: skip)")
    parser.add_argument("--sklearn-heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="layers=4, n=1000, d=256, heads=16")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.n, args.d, args.heads, args.sklearn_layers, args.sklearn_heads = (
            4,
            1000,
            256,
            16,
            2,
            4,
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {load[0]:.1f}")
    bench_layers(args.layers, args.n, args.d, args.restarts, args.sklearn_layers)
    if args.heads > 0:
        bench_heads(args.heads, 4000 if not args.quick else 1000, 128, args.sklearn_heads, 1024)


if __name__ == "__main__":
    main()
