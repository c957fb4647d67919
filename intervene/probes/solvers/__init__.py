"""The batched logistic-regression solver family the probes and ITI's head ranking share.

* :mod:`~intervene.probes.solvers.newton` — damped Newton (a Gram matrix per iteration; few iterations);
* :mod:`~intervene.probes.solvers.pcg` — preconditioned nonlinear CG with a fixed Böhning-bound
  preconditioner (:mod:`~intervene.probes.solvers.precond`: its diagonal, or one Gram matrix per feature
  matrix; then two feature passes per iteration), batched over chunks of feature matrices and the
  problems on each (cross-validation folds, values of ``C``);
  :mod:`~intervene.probes.solvers.pcg_single` — the same method for one unweighted problem per matrix,
  one matrix at a time in NumPy with the preconditioner from all rows;
  :mod:`~intervene.probes.solvers.heads` applies it to one probe per attention head (ITI's head ranking);
* :mod:`~intervene.probes.solvers.lbfgs` — batched L-BFGS for wide features.

All minimise scikit-learn's L2 objective (same minimiser as ``LogisticRegression(C=C)``).
``LogisticRegressionProbe(solver="auto")`` picks among them by shape (:func:`intervene.probes.lr.auto_solver`).
"""

from intervene.probes.solvers.heads import HeadProbes, fit_head_probes
from intervene.probes.solvers.lbfgs import lbfgs_linear
from intervene.probes.solvers.newton import (
    DEFAULT_CHUNK_BYTES,
    LogisticFit,
    fit_logistic,
    fit_logistic_1d,
    psd_cholesky,
    psd_solve,
)
from intervene.probes.solvers.pcg import PCGFit, fit_pcg
from intervene.probes.solvers.pcg_single import fit_pcg_single

__all__ = ["DEFAULT_CHUNK_BYTES", "HeadProbes", "LogisticFit", "PCGFit", "fit_head_probes", "fit_logistic",
           "fit_logistic_1d", "fit_pcg", "fit_pcg_single", "lbfgs_linear", "psd_cholesky", "psd_solve"]
