"""The merge's distance from each owner: exact where tensors fit the sample, an honest estimate beyond."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.distance import OwnerDistances, sample_positions


def exact(merged: dict, own: dict) -> float:
    """``||merged - own|| / ||own||`` over the tensors both hold with the same shape, by the plain formula."""
    shared = [n for n in merged if n in own and merged[n].shape == own[n].shape]
    difference = torch.cat([(merged[n] - own[n]).reshape(-1) for n in shared]).double()
    return float(torch.linalg.vector_norm(difference) / torch.linalg.vector_norm(
        torch.cat([own[n].reshape(-1) for n in shared]).double()))


@settings(max_examples=40, deadline=None)
@given(owners=st.integers(1, 4), shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1,
                                                  max_size=4), seed=st.integers(0, 2**31))
def test_small_tensors_give_the_exact_distance_whatever_the_parts(owners, shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    models = [{f"t{i}": torch.randn(shape, generator=generator) for i, shape in enumerate(shapes)}
              for _ in range(owners)]
    merged = {name: torch.randn(shape, generator=generator, dtype=torch.float64)
              for name, shape in zip(models[0], shapes)}
    distances = OwnerDistances(sample=100)
    for name in merged:  # one part per tensor: owners first, then the merge of that part
        for index, model in enumerate(models):
            distances.observe(f"owner{index}", {name: model[name]})
        distances.compare("regmean", {name: merged[name]})
    got = distances.relative()["regmean"]
    for index, model in enumerate(models):
        assert math.isclose(got[f"owner{index}"], exact(merged, model), rel_tol=1e-6)


def test_a_large_tensor_is_estimated_from_its_sample_within_two_percent():
    generator = torch.Generator().manual_seed(0)
    own = {"embed": torch.randn(1000, 600, generator=generator)}
    merged = {"embed": own["embed"] + 0.3 * torch.randn(1000, 600, generator=generator) ** 3}  # heavy-ish tails
    distances = OwnerDistances()
    distances.observe("a", own)
    distances.compare("m", merged)
    assert sample_positions("embed", 600_000) is not None
    assert math.isclose(distances.relative()["m"]["a"], exact(merged, own), rel_tol=0.02)


def test_tensors_of_another_shape_or_never_sent_are_left_out():
    own = {"body": torch.ones(3), "head": torch.ones(2, 4)}
    distances = OwnerDistances()
    distances.observe("a", own)
    distances.compare("m", {"body": torch.zeros(3), "head": torch.zeros(5, 4), "other": torch.zeros(7)})
    assert distances.relative()["m"]["a"] == 1.0  # the body alone: ||0 - 1|| / ||1||
