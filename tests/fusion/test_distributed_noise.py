"""Distributed DP noise (secure mode): each site adds 1/threshold of one noise to everything it releases, the sum over
the survivors carries the whole noise, products with the weights are noised to their own sensitivity, and two
secure runs one site apart give that site's Gram only to the noise level (fresh noise per run)."""

import math

import pytest
import torch
from helpers import perturbed, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.aggregate import owner_update
from fusion.budget import PrivacyBudget
from fusion.gram import collect_statistics
from fusion.methods import Sums
from fusion.methods.regmean import DIAG_WEIGHT, GRAM, GRAM_WEIGHT, NOISE_VARIANCE, RegMean
from fusion.privacy import NoiseShares, PrivacyError, PrivacySpec, add_noise, clipped_rows, noise_multiplier
from fusion.secure import layout_of, noised_units, public_bounds, secure_contributions
from test_privacy import SENTENCES, encode

EPSILON, DELTA, CLIP, BOUND = 4.0, 1e-5, 1.0, 50.0


@settings(deadline=None, max_examples=40)
@given(examples=st.integers(1, 5), tokens=st.integers(1, 7), features=st.integers(1, 6), outputs=st.integers(1, 5),
       clip=st.floats(0.1, 10.0), seed=st.integers(0, 10_000))
def test_replacing_an_example_moves_the_products_by_at_most_root_two_clip_times_the_weights_norm(
        examples, tokens, features, outputs, clip, seed):
    """The sensitivities the noise on G W^T and diag(G) W^T is sized for, against the data itself: replace one
    example of a data set by another and measure how far the Gram and each product move."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, features, generator=generator, dtype=torch.float64) * 3
    first = torch.randn(examples, tokens, features, generator=generator) * 10
    second = first.clone()
    second[0] = torch.randn(tokens, features, generator=generator) * 10
    mask = torch.ones(examples, tokens, dtype=torch.bool)
    grams = []
    for inputs in (first, second):
        rows, _, _ = clipped_rows(inputs, [mask], examples, clip, "layer")
        grams.append(rows.T @ rows)
    moved = grams[0] - grams[1]
    norm = float(torch.linalg.matrix_norm(weight, ord=2))
    bound = math.sqrt(2) * clip * (1 + 1e-9)
    assert float(torch.linalg.matrix_norm(moved)) <= bound
    assert float(torch.linalg.matrix_norm(moved @ weight.T)) <= bound * norm
    assert float(torch.linalg.matrix_norm(torch.diag(moved.diagonal()) @ weight.T)) <= bound * norm


def test_the_shares_of_threshold_sites_add_up_to_the_whole_noise_local_noise_needs():
    """t sites' shares: the variance of their sum is what one site's local noise would carry for the same release."""
    releases, threshold = 3, 4
    shares = NoiseShares(EPSILON, DELTA, 2.0, BOUND, threshold=threshold, releases=releases)
    local = add_noise({f"g{i}": torch.zeros(10) for i in range(releases)}, PrivacySpec(EPSILON, DELTA, 2.0), 100)
    assert shares.std(1.0) * math.sqrt(threshold) == pytest.approx(local.noise_std)
    assert shares.std(BOUND) == pytest.approx(BOUND * shares.std(1.0))
    summed = sum(NoiseShares(EPSILON, DELTA, 2.0, BOUND, threshold, releases, seed=site).noise("k", (200_000,),
                                                                                               shares.std(1.0))
                 for site in range(threshold))
    assert float(summed.std()) == pytest.approx(local.noise_std, rel=0.01)
    # the same seed and key give the same noise in every round; another key or seed, independent noise
    one = shares.noise("gram/a", (1000,), 1.0)
    assert torch.equal(one, shares.noise("gram/a", (1000,), 1.0))
    assert abs(float(torch.corrcoef(torch.stack([one, shares.noise("gram/b", (1000,), 1.0)]))[0, 1])) < 0.15
    with pytest.raises(PrivacyError, match="dp-delta"):
        NoiseShares(EPSILON, 0.0, CLIP, BOUND, threshold=2)
    with pytest.raises(PrivacyError, match="dp-weight-bound"):
        NoiseShares(EPSILON, DELTA, CLIP, 0.0, threshold=2)
    assert shares.spending("d")["noise_multiplier"] == noise_multiplier(EPSILON, DELTA)


def site(seed: int, sentences: list[str]):
    model = perturbed(tiny_model("bert"), seed=seed)
    stats = collect_statistics(model, [encode(sentences)], privacy=PrivacySpec(EPSILON, DELTA, CLIP),
                               draw_noise=False)
    return model, owner_update(f"o{seed}", model, stats)


def contributions(owner, noise):
    return secure_contributions([RegMean()], owner, True, noise)


def test_a_site_noises_every_release_to_its_sensitivity_and_bounds_it_publicly():
    model, owner = site(30, SENTENCES)
    exact = contributions(owner, None)
    layout = layout_of(contributions(owner, NoiseShares(EPSILON, DELTA, CLIP, BOUND, threshold=1)))
    units = noised_units([RegMean()], layout, BOUND)
    assert units and all(units[k] == 1.0 for k in units if f"/{GRAM}" in k)
    assert all(units[k] == BOUND for k in units if f"/{GRAM_WEIGHT}" in k or f"/{DIAG_WEIGHT}" in k)
    assert not any("/mean/" in k for k in units)  # the weights are outside the guarantee, as everywhere
    noise = NoiseShares(EPSILON, DELTA, CLIP, BOUND, threshold=3, releases=len(units), seed=11)
    noisy = contributions(owner, noise)
    standardised = torch.cat([(noisy[key] - exact[key]).reshape(-1) / noise.std(unit) for key, unit in units.items()])
    assert float(standardised.std()) == pytest.approx(1.0, rel=0.04)  # each tensor its own scale, thousands of draws
    assert abs(float(standardised.mean())) < 0.04
    for key in exact:
        if key not in units:
            assert torch.equal(noisy[key], exact[key]), key
    variances = {k: float(v) for k, v in noisy.items() if f"/{NOISE_VARIANCE}" in k}
    assert variances and all(v == pytest.approx(noise.std(1.0) ** 2) for v in variances.values())
    bounds = public_bounds(units, noise, owner.statistics.example_count)
    for key, bound in bounds.items():  # a public number above every entry the site sends, noise included
        assert float(noisy[key].abs().max()) <= float(bound)
    # a layer above the public bound on the weights' norm is refused, naming it
    with pytest.raises(PrivacyError, match="spectral norm is above dp-weight-bound") as refused:
        contributions(owner, NoiseShares(EPSILON, DELTA, CLIP, 1e-3, threshold=1))
    assert "layer" in refused.value.public
    with pytest.raises(PrivacyError, match="weighting"):
        secure_contributions([RegMean(weighting="equal")], owner, True, noise)


def test_two_secure_runs_one_site_apart_give_that_site_only_to_the_noise_level():
    """The differencing attack on two secure sums, one with site 3 and one without. Noise off: site 3's Gram to
    1e-12. Distributed noise, fresh in each run: the difference carries both runs' noise, more than the whole noise
    one release needs. The same noise reused across runs (what a site must never do) would leave only site 3's
    share of it: the reason every run draws anew and is charged to the budget."""
    owners = [site(40 + i, SENTENCES[i:i + 3])[1] for i in range(4)]
    layout = layout_of(contributions(owners[0], NoiseShares(EPSILON, DELTA, CLIP, BOUND, threshold=1)))
    releases = len(noised_units([RegMean()], layout, BOUND))
    grams = sorted(k for k in layout_of(contributions(owners[0], None)) if k[0].startswith("0/body/gram/"))
    keys = [key for key, _ in grams]
    clean = torch.cat([contributions(owners[3], None)[key] for key in keys])

    def run(members, seeds):
        total = Sums()
        for index in members:
            noise = None if seeds is None else NoiseShares(EPSILON, DELTA, CLIP, BOUND, threshold=3,
                                                           releases=releases, seed=seeds[index])
            total.add(contributions(owners[index], noise))
        return torch.cat([total[key] for key in keys])

    exact = run(range(4), None) - run(range(3), None)
    assert float((exact - clean).abs().max()) <= 1e-12 * float(clean.abs().max())
    whole = NoiseShares(EPSILON, DELTA, CLIP, BOUND, threshold=1, releases=releases).std(1.0)
    fresh = run(range(4), [1, 2, 3, 4]) - run(range(3), [5, 6, 7])
    error = float((fresh - clean).pow(2).mean().sqrt())
    assert error == pytest.approx(whole * math.sqrt(7 / 3), rel=0.05)  # 4/3 + 3/3 of the whole noise's variance
    assert error > whole
    reused = run(range(4), [1, 2, 3, 4]) - run(range(3), [1, 2, 3])
    assert float((reused - clean).pow(2).mean().sqrt()) == pytest.approx(whole / math.sqrt(3), rel=0.05)


def test_a_run_is_charged_once_and_refused_past_the_budget_before_anything_is_recorded(tmp_path):
    noise = NoiseShares(EPSILON, DELTA, CLIP, BOUND, threshold=3)
    budget = PrivacyBudget(tmp_path / "budget.json", 1.4 * EPSILON)  # two runs compose to 1.5 epsilon
    budget.check(noise.spending("secure/a"))
    assert not budget.path.exists()  # a check records nothing
    spent = budget.spend(noise.spending("secure/a"))
    assert spent == pytest.approx(EPSILON, rel=1e-3)
    assert budget.spend(noise.spending("secure/a")) == spent  # the same run's release again: no more
    with pytest.raises(PrivacyError, match="past its budget") as refused:
        budget.check(noise.spending("secure/b"))  # a second run: 1.5 epsilon in all
    assert "dp-budget" in refused.value.public
    assert len(budget.draws()) == 1
