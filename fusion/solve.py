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

# Relative precision of a summed Gram, by the dtype its per-batch products were computed in. Eigenvalues below
# precision * largest cannot be told from zero (a float32 product can even make them negative), so those directions
# are regularised towards the prior; the rest are solved exactly.
GRAM_PRECISION = {"float64": 1e-12, "float32": 1e-6}
RIDGE_TRIES = 3


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


def solve_gram(
    gram: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor, precision: float = GRAM_PRECISION["float64"]
) -> tuple[torch.Tensor, SolveReport]:
    """``X`` minimising ``tr(X^T G X) - 2 tr(X^T R)``, regularised towards ``prior`` where ``G`` is singular.

    ``gram`` is d x d, ``rhs`` and ``prior`` d x k; all float64. ``precision`` is the Gram's relative precision
    (see ``GRAM_PRECISION``). Returns X (d x k) and how it was solved.
    """
    condition, largest = condition_number(gram)
    if largest <= 0.0:  # no data reached this layer at all: nothing to regress on
        return prior.clone(), SolveReport(condition, 0.0, "none")
    # Solving for the step from the prior makes both the ridge and the minimum-norm fallback pull towards it.
    residual = rhs - gram @ prior
    ridge = 0.0 if condition * precision < 1.0 else precision * largest
    identity = torch.eye(gram.shape[0], dtype=gram.dtype)
    for _ in range(RIDGE_TRIES):
        factor, info = torch.linalg.cholesky_ex(gram + ridge * identity if ridge else gram)
        if int(info) == 0:
            delta = torch.cholesky_solve(residual, factor)
            return prior + delta, SolveReport(condition, ridge, "cholesky+ridge" if ridge else "cholesky")
        ridge = max(ridge * 10.0, precision * largest)
    delta = torch.linalg.lstsq(gram, residual, rcond=precision, driver="gelsd").solution
    return prior + delta, SolveReport(condition, 0.0, "lstsq")
