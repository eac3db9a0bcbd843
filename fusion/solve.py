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


NOISY_SOLVER = "cholesky+noise-ridge"
NOISY_TRIES = 20  # doublings: a million times the rule's ridge before giving up

ESTIMATE_STEPS = 10
CONDITION_ESTIMATE = f"lower bound: {ESTIMATE_STEPS} power steps on G and on G^-1 (through its Cholesky factor)"


@dataclass(frozen=True)
class SolveReport:
    condition: float  # of the (alpha-reduced) summed Gram, estimated (CONDITION_ESTIMATE); inf if not positive definite
    ridge: float  # added to the diagonal, 0.0 when none was needed
    solver: str  # "cholesky", "cholesky+ridge", "lstsq", or "none" (no data reached the layer)

    def as_dict(self) -> dict:
        return {
            "condition": self.condition if math.isfinite(self.condition) else "inf",
            "ridge": self.ridge,
            "solver": self.solver,
        }


def _power(apply, dim: int, dtype: torch.dtype, device: torch.device) -> float:
    """The largest eigenvalue of the symmetric positive semi-definite operator ``apply``, from below (Rayleigh
    quotients of a few power steps from a fixed start; exact for the top eigenvector, close once it dominates)."""
    vector = torch.ones(dim, 1, dtype=dtype, device=device) + torch.linspace(0.0, 1.0, dim, dtype=dtype,
                                                                              device=device).unsqueeze(1)
    vector /= vector.norm()
    estimate = 0.0
    for _ in range(ESTIMATE_STEPS):
        image = apply(vector)
        estimate = max(estimate, float((vector * image).sum()))
        norm = image.norm()
        if float(norm) == 0.0:
            break
        vector = image / norm
    return estimate


def largest_eigenvalue(gram: torch.Tensor) -> float:
    return _power(lambda v: gram @ v, gram.shape[0], gram.dtype, gram.device)


def condition_estimate(gram: torch.Tensor, factor: torch.Tensor, largest: float) -> float:
    """``largest / smallest`` eigenvalue of ``gram`` from its Cholesky ``factor``: the smallest eigenvalue is the
    inverse of the largest of ``G^-1``, found by power steps that each cost two triangular solves, not ``d^3``."""
    inverse_largest = _power(lambda v: torch.cholesky_solve(v, factor), gram.shape[0], gram.dtype, gram.device)
    return largest * inverse_largest if inverse_largest > 0.0 else math.inf


def solve_gram(
    gram: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor, precision: float = GRAM_PRECISION["float64"],
    noise_ridge: float = 0.0,
) -> tuple[torch.Tensor, SolveReport]:
    """``X`` minimising ``tr(X^T G X) - 2 tr(X^T R)``, regularised towards ``prior`` where ``G`` is singular.

    ``gram`` is d x d, ``rhs`` and ``prior`` d x k; all float64. ``precision`` is the Gram's relative precision
    (see ``GRAM_PRECISION``). Returns X (d x k) and how it was solved. No eigendecomposition: one Cholesky
    factorisation (two or three where a ridge is needed) and a few matrix-vector products.

    ``noise_ridge`` > 0: the Gram carries differential-privacy noise (:func:`fusion.privacy.noise_ridge`); it is
    solved with that ridge towards the prior, doubled until the factorisation succeeds.
    """
    if noise_ridge > 0.0:
        return _solve_noisy(gram, rhs, prior, noise_ridge)
    largest = largest_eigenvalue(gram)
    if largest <= 0.0:  # no data reached this layer at all: nothing to regress on
        return prior.clone(), SolveReport(math.inf, 0.0, "none")
    factor, info = torch.linalg.cholesky_ex(gram)
    condition = condition_estimate(gram, factor, largest) if int(info) == 0 else math.inf
    if condition * precision < 1.0:
        return torch.cholesky_solve(rhs, factor), SolveReport(condition, 0.0, "cholesky")
    del factor
    # Solving for the step from the prior makes both the ridge and the minimum-norm fallback pull towards it.
    residual = rhs - gram @ prior
    # Eigenvalues below precision * largest cannot be told from zero: a ridge of that size pulls those directions
    # towards the prior and leaves the others solved.
    ridge = precision * largest
    diagonal = gram.diagonal()
    for _ in range(RIDGE_TRIES):
        diagonal += ridge  # in place: no second d x d copy of the Gram
        factor, info = torch.linalg.cholesky_ex(gram)
        diagonal -= ridge
        if int(info) == 0:
            return prior + torch.cholesky_solve(residual, factor), SolveReport(condition, ridge, "cholesky+ridge")
        ridge *= 10.0
    # gelsd (minimum norm, rank-revealing) is a CPU driver: the rare fallback runs there whatever the device.
    delta = torch.linalg.lstsq(gram.cpu(), residual.cpu(), rcond=precision, driver="gelsd").solution
    return prior + delta.to(prior.device), SolveReport(condition, 0.0, "lstsq")


def _solve_noisy(gram: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor,
                 ridge: float) -> tuple[torch.Tensor, SolveReport]:
    """``prior + (G + ridge I)^-1 (R - G prior)``: a noisy Gram may be indefinite, so the ridge is raised until
    ``G + ridge I`` factorises. The report's condition is that of the regularised Gram."""
    residual = rhs - gram @ prior
    diagonal = gram.diagonal()
    for _ in range(NOISY_TRIES):
        diagonal += ridge  # in place: no second d x d copy of the Gram
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            condition = condition_estimate(gram, factor, largest_eigenvalue(gram))
            diagonal -= ridge
            return prior + torch.cholesky_solve(residual, factor), SolveReport(condition, ridge, NOISY_SOLVER)
        diagonal -= ridge
        ridge *= 2.0
    return prior.clone(), SolveReport(math.inf, ridge, "none")
