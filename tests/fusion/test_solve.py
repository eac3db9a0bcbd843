"""The solve's condition estimate: a truthful lower bound of the exact condition number, and a close one."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.solve import condition_estimate, largest_eigenvalue, solve_gram


@settings(deadline=None, max_examples=40)
@given(dim=st.integers(2, 200), extra_rows=st.integers(0, 200), spread=st.floats(0.0, 4.0), seed=st.integers(0, 10_000))
def test_condition_estimate_is_a_close_lower_bound_of_the_exact_one(dim, extra_rows, spread, seed):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0.0, spread, dim, dtype=torch.float64)  # condition up to about 10^(2 * spread)
    inputs = torch.randn(dim + extra_rows, dim, generator=generator, dtype=torch.float64) * scales
    gram = inputs.T @ inputs
    eigenvalues = torch.linalg.eigvalsh(gram)  # the independent reference: a full eigendecomposition
    exact = float(eigenvalues[-1] / eigenvalues[0])
    estimate = condition_estimate(gram, torch.linalg.cholesky(gram), largest_eigenvalue(gram))
    assert estimate <= exact * (1 + 1e-9)
    assert estimate >= exact / 3  # 10 power steps each way: 0.71 was the worst of 200 random cases


def test_solve_reports_the_estimate_and_solves_exactly_when_well_conditioned():
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(50, 8, generator=generator, dtype=torch.float64)
    gram, rhs = inputs.T @ inputs, torch.randn(8, 3, generator=generator, dtype=torch.float64)
    solution, report = solve_gram(gram, rhs, torch.zeros(8, 3, dtype=torch.float64))
    torch.testing.assert_close(solution, torch.linalg.solve(gram, rhs), rtol=1e-10, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(gram)
    assert report.solver == "cholesky" and report.condition <= float(eigenvalues[-1] / eigenvalues[0]) * (1 + 1e-9)
