"""The regression solve of RegMean: never a bare inverse.

We solve ``G X = R`` for ``X = W^T`` in float64 by Cholesky. Where ``G`` is (nearly) singular, as the Gram of a layer
fed token embeddings of a small data set often is, a small ridge relative to its largest eigenvalue is added and, if
Cholesky still fails, a minimum-norm least-squares solve is used. Both regularise towards a *prior* (the averaged
weights) rather than towards zero: in directions no owner's data reaches, the merge keeps the average instead of
erasing the layer there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Beyond this condition number float64 Cholesky keeps fewer than about 4 correct digits; regularise.
MAX_CONDITION = 1e12
RELATIVE_RIDGE = 1e-12


@dataclass(frozen=True)
class SolveReport:
    condition: float  # of the (alpha-reduced) summed Gram: largest / smallest eigenvalue, inf if singular
    ridge: float  # added to the diagonal, 0.0 when none was needed
    solver: str  # "cholesky", "cholesky+ridge" or "lstsq"

    def as_dict(self) -> dict:
        return {
            "condition": self.condition if math.isfinite(self.condition) else "inf",
            "ridge": self.ridge,
            "solver": self.solver,
        }


def condition_number(gram: torch.Tensor) -> tuple[float, float]:
    """Condition number and largest eigenvalue of a symmetric positive semi-definite matrix."""
    eigenvalues = torch.linalg.eigvalsh(gram)
    largest = float(eigenvalues[-1])
    smallest = float(eigenvalues[0])
    if largest <= 0.0:
        return math.inf, largest
    return (largest / smallest if smallest > 0.0 else math.inf), largest


def solve_gram(gram: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, SolveReport]:
    """``X`` minimising ``tr(X^T G X) - 2 tr(X^T R)``, regularised towards ``prior`` where ``G`` is singular.

    ``gram`` is d x d, ``rhs`` and ``prior`` d x k; all float64. Returns X (d x k) and how it was solved.
    """
    condition, largest = condition_number(gram)
    if largest <= 0.0:  # no data reached this layer at all: nothing to regress on
        return prior.clone(), SolveReport(condition, 0.0, "none")
    residual = rhs - gram @ prior
    ridge = 0.0 if condition <= MAX_CONDITION else RELATIVE_RIDGE * largest
    system = gram if ridge == 0.0 else gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        delta = torch.cholesky_solve(residual, factor)
        return prior + delta, SolveReport(condition, ridge, "cholesky" if ridge == 0.0 else "cholesky+ridge")
    delta = torch.linalg.lstsq(gram, residual, driver="gelsd").solution
    return prior + delta, SolveReport(condition, 0.0, "lstsq")
