"""RegMean against independent formulas: pooled least squares, hand-computed cases, alpha and weighting semantics."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.gram import CONV1D, LINEAR
from fusion.statistics import pack_upper
from fusion.merge import merge_states
from fusion.methods import OwnerState, get_method
from fusion.statistics import GramStatistics, ModuleInfo


def layer_owner(name, inputs, weight, kind=LINEAR, examples=None, bias=None):
    """An owner of one linear layer ``layer`` with inputs ``inputs`` (tokens x in) and weight (out x in)."""
    stats = GramStatistics(
        grams={"layer": pack_upper(inputs.T @ inputs)},
        dims={"layer": inputs.shape[1]},
        token_counts={"layer": inputs.shape[0]},
        pads_excluded={"layer": True},
        modules={"layer": ModuleInfo("layer", kind, "layer.weight")},
        example_count=examples if examples is not None else inputs.shape[0],
        fingerprint="-",
    )
    params = {"layer.weight": weight if kind == LINEAR else weight.T.contiguous()}
    if bias is not None:
        params["layer.bias"] = bias
    return OwnerState(name, params, stats)


def merged_weight(owners, kind=LINEAR, **options):
    outcome = merge_states(owners, get_method("regmean", **options))
    weight = outcome.params["layer.weight"]
    return weight if kind == LINEAR else weight.T, outcome


@settings(deadline=None, max_examples=40)
@given(
    owners=st.integers(1, 4),
    dim_in=st.integers(1, 12),
    dim_out=st.integers(1, 6),
    extra_rows=st.lists(st.integers(0, 20), min_size=4, max_size=4),
    kind=st.sampled_from([LINEAR, CONV1D]),
    seed=st.integers(0, 2**31 - 1),
)
def test_single_layer_equals_pooled_least_squares(owners, dim_in, dim_out, extra_rows, kind, seed):
    """alpha = 1: the merge is ordinary least squares on the pooled inputs and every owner's outputs."""
    rng = np.random.default_rng(seed)
    inputs = [torch.from_numpy(rng.normal(size=(dim_in + extra_rows[i], dim_in))) for i in range(owners)]
    weights = [torch.from_numpy(rng.normal(size=(dim_out, dim_in))) for _ in range(owners)]
    merged, outcome = merged_weight(
        [layer_owner(f"o{i}", x, w, kind) for i, (x, w) in enumerate(zip(inputs, weights))], kind
    )
    pooled_x = np.vstack([x.numpy() for x in inputs])
    pooled_y = np.vstack([x.numpy() @ w.numpy().T for x, w in zip(inputs, weights)])
    expected, *_ = np.linalg.lstsq(pooled_x, pooled_y, rcond=None)
    np.testing.assert_allclose(merged.numpy().T, expected, rtol=1e-6, atol=1e-6)
    assert outcome.layers["layer"]["solver"] == "cholesky"


def test_hand_computed_scalar_case():
    # x1 = 1, w1 = 1; x2 = 2, w2 = 4: W = (1*1*1 + 2*2*4) / (1 + 4) = 17 / 5.
    owners = [
        layer_owner("a", torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64)),
        layer_owner("b", torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[4.0]], dtype=torch.float64)),
    ]
    merged, _ = merged_weight(owners)
    assert merged.item() == pytest.approx(17 / 5, rel=1e-12)


def test_hand_computed_two_by_two():
    # Owner a sees only feature 0, owner b only feature 1: the answer is checkable by hand.
    xa = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    xb = torch.tensor([[0.0, 3.0]], dtype=torch.float64)
    wa = torch.tensor([[1.0, 5.0]], dtype=torch.float64)
    wb = torch.tensor([[7.0, -1.0]], dtype=torch.float64)
    merged, _ = merged_weight([layer_owner("a", xa, wa), layer_owner("b", xb, wb)])
    # Each feature is taken from the one owner whose data reaches it.
    assert merged[0].tolist() == pytest.approx([1.0, -1.0])


def test_alpha_zero_is_the_diagonal_weighted_average():
    rng = np.random.default_rng(3)
    inputs = [torch.from_numpy(rng.normal(size=(9, 4))) for _ in range(3)]
    weights = [torch.from_numpy(rng.normal(size=(2, 4))) for _ in range(3)]
    merged, _ = merged_weight([layer_owner(f"o{i}", x, w) for i, (x, w) in enumerate(zip(inputs, weights))], alpha=0.0)
    diagonals = [(x**2).sum(0) for x in inputs]  # diag(X^T X)
    expected = sum(d * w for d, w in zip(diagonals, weights)) / sum(diagonals)
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-12)


def test_alpha_between_uses_the_reduced_gram():
    rng = np.random.default_rng(4)
    inputs = [torch.from_numpy(rng.normal(size=(9, 4))) for _ in range(2)]
    weights = [torch.from_numpy(rng.normal(size=(3, 4))) for _ in range(2)]
    alpha = 0.3
    merged, _ = merged_weight([layer_owner(f"o{i}", x, w) for i, (x, w) in enumerate(zip(inputs, weights))], alpha=alpha)

    def reduced(x):
        gram = x.T @ x
        return alpha * gram + (1 - alpha) * torch.diag(gram.diagonal())

    expected_t = torch.linalg.solve(sum(reduced(x) for x in inputs), sum(reduced(x) @ w.T for x, w in zip(inputs, weights)))
    torch.testing.assert_close(merged, expected_t.T, rtol=1e-10, atol=1e-12)


def test_sum_weighting_counts_tokens_equal_weighting_does_not():
    """Doubling one owner's data (same distribution) pulls the 'sum' merge to it but leaves 'equal' unchanged."""
    rng = np.random.default_rng(5)
    xa, xb = (torch.from_numpy(rng.normal(size=(10, 3))) for _ in range(2))
    wa, wb = (torch.from_numpy(rng.normal(size=(2, 3))) for _ in range(2))
    once = [layer_owner("a", xa, wa), layer_owner("b", xb, wb)]
    twice = [layer_owner("a", torch.cat([xa, xa]), wa), layer_owner("b", xb, wb)]
    for weighting, should_change in (("sum", True), ("equal", False)):
        before, _ = merged_weight(once, weighting=weighting)
        after, _ = merged_weight(twice, weighting=weighting)
        assert (not torch.allclose(before, after, rtol=1e-9)) == should_change, weighting
    # 'equal' is the paper's code: mean Grams (G_i / tokens_i) in the same regression.
    equal, _ = merged_weight(once, weighting="equal")
    means = [x.T @ x / x.shape[0] for x in (xa, xb)]
    expected_t = torch.linalg.solve(sum(means), means[0] @ wa.T + means[1] @ wb.T)
    torch.testing.assert_close(equal, expected_t.T, rtol=1e-10, atol=1e-12)


def test_other_tensors_are_count_weighted_or_equal():
    x = torch.eye(2, dtype=torch.float64)
    w = torch.eye(2, dtype=torch.float64)
    owners = [
        layer_owner("a", x, w, examples=1, bias=torch.tensor([0.0, 0.0], dtype=torch.float64)),
        layer_owner("b", x, w, examples=3, bias=torch.tensor([4.0, 8.0], dtype=torch.float64)),
    ]
    summed = merge_states(owners, get_method("regmean")).params["layer.bias"]
    equal = merge_states(owners, get_method("regmean", weighting="equal")).params["layer.bias"]
    assert summed.tolist() == [3.0, 6.0]
    assert equal.tolist() == [2.0, 4.0]


def test_rank_deficient_layer_keeps_the_average_where_no_data_reaches():
    """Feature 2 is never seen by any owner: the merge keeps the average there, and is optimal elsewhere."""
    rng = np.random.default_rng(6)
    inputs = []
    for _ in range(2):
        x = rng.normal(size=(8, 3))
        x[:, 2] = 0.0
        inputs.append(torch.from_numpy(x))
    weights = [torch.from_numpy(rng.normal(size=(2, 3))) for _ in range(2)]
    owners = [layer_owner(f"o{i}", x, w) for i, (x, w) in enumerate(zip(inputs, weights))]
    merged, outcome = merged_weight(owners)
    report = outcome.layers["layer"]
    assert report["condition"] == "inf" and report["solver"] != "cholesky"
    average = (weights[0] + weights[1]) / 2
    torch.testing.assert_close(merged[:, 2], average[:, 2], rtol=1e-6, atol=1e-8)
    seen = slice(0, 2)
    expected_t = torch.linalg.solve(
        sum(x[:, seen].T @ x[:, seen] for x in inputs), sum(x[:, seen].T @ x @ w.T for x, w in zip(inputs, weights))
    )
    torch.testing.assert_close(merged[:, seen], expected_t.T, rtol=1e-6, atol=1e-8)
    assert any("ill-conditioned" in warning for warning in outcome.warnings)


def test_layer_without_statistics_for_an_owner_is_averaged_with_a_warning():
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.normal(size=(6, 3)))
    wa, wb = (torch.from_numpy(rng.normal(size=(2, 3))) for _ in range(2))
    a = layer_owner("a", x, wa, examples=2)
    b = layer_owner("b", x, wb, examples=2)
    b.statistics.modules.clear()
    b.statistics.grams.clear()
    outcome = merge_states([a, b], get_method("regmean"))
    torch.testing.assert_close(outcome.params["layer.weight"], (wa + wb) / 2)
    assert any("statistics missing" in warning for warning in outcome.warnings)


@settings(deadline=None, max_examples=8)
@given(
    kind=st.sampled_from(["bert", "distilbert", "gpt2"]),
    owners=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_whole_tiny_model_every_layer_at_the_pooled_optimum(kind, owners, seed):
    """On a whole model (float64 throughout), every merged layer attains the pooled least-squares objective."""
    import random

    from helpers import WORDS, kinds_of, layer_inputs, module_weight, perturbed, pooled_least_squares
    from helpers import pooled_objective, tiny_model, tokenizer, weight_t

    from fusion.gram import collect_statistics

    rng = random.Random(seed)
    base = tiny_model(kind, seed=seed % 7).double()
    states, inputs, models = [], [], []
    for i in range(owners):
        model = perturbed(base, seed=seed + i)
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(20, 30))]
        batch = dict(tokenizer()(texts, padding=True, return_tensors="pt"))
        params = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        states.append(OwnerState(f"o{i}", params, collect_statistics(model, [batch])))
        inputs.append(layer_inputs(model, [batch]))
        models.append(model)
    merged = merge_states(states, get_method("regmean")).params
    for module, kind_of in kinds_of(base).items():
        xs = [owner_inputs[module] for owner_inputs in inputs]
        targets = [weight_t(module_weight(model, module), kind_of) for model in models]
        optimum = pooled_objective(xs, targets, pooled_least_squares(xs, targets))
        achieved = pooled_objective(xs, targets, weight_t(merged[f"{module}.weight"], kind_of))
        assert achieved - optimum <= 1e-6 * optimum + 1e-12, module
