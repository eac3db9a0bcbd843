"""The finite check every weight and Gram goes through, against torch.isfinite on the same values."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.finite import all_finite

SPECIAL = [math.nan, math.inf, -math.inf, 3e38, -3e38, 1e308, 0.0]


@settings(deadline=None, max_examples=200)
@given(size=st.integers(0, 40), specials=st.lists(st.tuples(st.integers(0, 39), st.sampled_from(SPECIAL)), max_size=4),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 99))
def test_all_finite_agrees_with_isfinite(size, specials, dtype, seed):
    values = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10
    for index, value in specials:
        if index < size:
            values[index] = value
    values = values.to(dtype)  # 3e38 and 1e308 overflow to inf in the narrower types, as they would on disk
    assert all_finite(values) == bool(torch.isfinite(values).all())


def test_finite_entries_whose_sum_overflows_are_finite():
    assert all_finite(torch.full((4,), 3e38, dtype=torch.float32))  # the sum is inf; every entry is finite
    assert all_finite(torch.full((8,), 60000.0, dtype=torch.float16))  # beyond float16 summed: accumulated in float32
    assert not all_finite(torch.tensor([1.0, math.nan]))
