"""Differential privacy for released statistics: per-example clipping, the Gaussian mechanism, and its accounting.

What is protected: every example of a site's data, in the Grams and everything computed from them, against the
*replacement* of that example by any other (the number of examples is public, below). What is not: the weights. A fine-tuned model memorises its training data unless it was trained with DP-SGD, and RegMean needs the
weights, so a site that sends them (plaintext mode) or products with them (secure mode) releases what they hold.

The mechanism, per site (local noise; every release made from the noisy file is post-processing, so re-sending it in
any number of runs, or taking the site out of a merge, spends nothing more):

1. **Clipping, in the statistics only.** Each token's input row to a layer is scaled to unit norm, and an example's
   rows are weighted so that together they count as at most ``clip`` tokens: ``min(1, clip / T)`` for an example of
   ``T`` real tokens. The example's share of each Gram, a sum of unit outer products, then has Frobenius norm at
   most ``clip``. The forward pass never sees the scaling. RegMean is invariant to a common scale of one layer's
   Grams, and unit rows only reweight tokens against each other; with the default ``clip = 1`` every example adds
   the mean of its tokens' outer products.
2. **Analyze Gauss** (Dwork, Talwar, Thakurta, Zhang, STOC 2014): i.i.d. Gaussian noise on each packed upper
   triangle (the symmetric matrix mirrors it). The triangle's L2 norm is at most the matrix's Frobenius norm, and
   replacing one example by another changes a Gram by ``A - B``, both positive semi-definite of norm at most
   ``clip``, so by at most ``sqrt(2) clip`` (``<A, B> >= 0``); over all ``K`` released triangles the sensitivity is
   ``sqrt(2 K) clip``, and the noise's standard deviation ``noise_multiplier * sqrt(2 K) * clip``, the multiplier
   calibrated to ``(epsilon, delta)`` exactly (the analytic Gaussian mechanism; see :func:`gaussian_epsilon`).
3. **The example count is public by policy** (the number of examples a site holds is seldom a secret; noising it
   is not built). Token counts are not: under DP every Gram's count is released as the example count, and how many
   examples were clipped stays at the site (:attr:`fusion.statistics.GramStatistics.clipped_examples`).

The merge regularises the noisy sum: see :func:`noise_ridge`.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import GramfuseError

ACCOUNTANT = "analytic Gaussian mechanism (Balle & Wang 2018), composed as Gaussian DP (Dong, Roth & Su 2019)"
MAX_EPSILON = 100.0  # beyond it a guarantee means nothing, and e^epsilon leaves floating point
# Below it the noise multiplier runs into the thousands (about 5e3 at delta 1e-10): the Grams would be all noise.
MIN_EPSILON = 1e-3
# Versions the calibration: "replacement-2" is replacement adjacency with N public, sensitivity sqrt(2) clip per
# Gram, token counts withheld (files drawn before it had no version and must be redrawn, not reused).
MECHANISM = "analyze-gauss/replacement-2"
# Far beyond any Gaussian draw: a noisy Gram's diagonal entry below -TAIL_SIGMAS standard deviations is not noise.
TAIL_SIGMAS = 10.0
# Wigner: a symmetric d x d matrix of N(0, s^2) entries has spectral norm about 2 s sqrt(d), and above it with
# probability that vanishes in d (Tracy-Widom tails).
SPECTRAL_FACTOR = 2.0
# The ridge's margin beyond the noise's spectral edge, in units of s sqrt(d): the least eigenvalue of the
# regularised Gram, which bounds how much the solve can amplify the noise (see noise_ridge).
RIDGE_MARGIN = 1.0


class PrivacyError(GramfuseError):
    """A differential-privacy request that cannot be honoured: bad parameters, a spent budget, an unclippable layer."""


@dataclass(frozen=True)
class PrivacySpec:
    """What a site asks for: ``(epsilon, delta)``-DP of its released statistics, with per-example ``clip``.

    ``delta`` of ``None`` is ``1 / N^2`` for a site of ``N`` examples. ``seed`` fixes the noise: for tests only,
    as whoever knows the seed can subtract the noise."""

    epsilon: float
    delta: float | None = None
    clip: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not MIN_EPSILON <= self.epsilon <= MAX_EPSILON:
            raise PrivacyError(f"DP epsilon must be between {MIN_EPSILON:g} and {MAX_EPSILON:g}, not {self.epsilon}")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise PrivacyError(f"DP delta must be in (0, 1), not {self.delta}")
        if not (self.clip > 0.0 and math.isfinite(self.clip)):
            raise PrivacyError(f"DP clip must be a positive number of tokens, not {self.clip}")

    def request(self) -> dict[str, Any]:
        """What identifies the request in the statistics' settings (the seed does not: it is not a setting). The
        mechanism's version is part of it, so a file drawn under an earlier calibration is not reused as if it
        were this one's."""
        return {"epsilon": self.epsilon, "delta": self.delta, "clip": self.clip, "mechanism": MECHANISM}

    def clipping(self) -> dict[str, Any]:
        """What identifies clipped statistics not yet noised: the clip alone (one clipped file serves every epsilon
        whose noise is added per release, as distributed noise is)."""
        return {"clip": self.clip, "mechanism": MECHANISM, "noise": "none"}

    def delta_for(self, example_count: int) -> float:
        """``delta``, or ``1 / N^2``; a delta above ``1 / N`` is refused: it allows giving away one example whole."""
        if self.delta is None:
            return 1.0 / max(example_count, 2) ** 2
        if self.delta > 1.0 / example_count:
            raise PrivacyError(f"DP delta {self.delta:g} is above 1/N = {1.0 / example_count:.3g} for N = "
                               f"{example_count} examples: such a delta allows releasing one example outright",
                               public="the DP delta is above 1/N for this site's N examples")
        return self.delta


def _normal_cdf(value: float) -> float:
    return 0.5 * math.erfc(-value / math.sqrt(2.0))


def gaussian_delta(mu: float, epsilon: float) -> float:
    """The exact delta at ``epsilon`` of a Gaussian mechanism whose sensitivity is ``mu`` standard deviations
    (Balle & Wang, ICML 2018, Theorem 8): ``Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)``."""
    tail = _normal_cdf(-mu / 2.0 - epsilon / mu)
    return _normal_cdf(mu / 2.0 - epsilon / mu) - (math.exp(epsilon + math.log(tail)) if tail > 0.0 else 0.0)


def _bisect(predicate, low: float, high: float, steps: int = 200) -> float:
    """The boundary in ``[low, high]`` where ``predicate`` turns from False to True (it must be monotone)."""
    for _ in range(steps):
        middle = (low + high) / 2.0
        low, high = (low, middle) if predicate(middle) else (middle, high)
    return high


def gaussian_epsilon(noise_multipliers: Iterable[float], delta: float) -> float:
    """Epsilon at ``delta`` of Gaussian mechanisms of these noise multipliers (std / L2 sensitivity), composed.

    Exact, not a bound: Gaussian mechanisms compose into one whose ``mu`` is the root of the sum of their
    ``mu^2 = 1 / z^2`` (Dong, Roth & Su, 2019, Gaussian differential privacy), whose delta is the closed form above.
    Google's ``dp-accounting`` (PLD) gives the same numbers to its discretisation (the tests compare), but it takes
    15 s to calibrate at epsilon 20 and runs out of memory at 100 on a 24 GiB machine, so the closed form is ours.
    """
    multipliers = list(noise_multipliers)
    if not multipliers:
        return 0.0
    mu = math.sqrt(sum(1.0 / z ** 2 for z in multipliers))
    return _bisect(lambda epsilon: gaussian_delta(mu, epsilon) <= delta, 0.0, MAX_EPSILON * 10)


def noise_multiplier(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier of one Gaussian mechanism that is ``(epsilon, delta)``-DP (exact, as above)."""
    if gaussian_delta(1e-6, epsilon) > delta:  # even a million times the sensitivity would not do
        raise PrivacyError(f"no noise multiplier up to 1e6 gives ({epsilon:g}, {delta:g})-DP")
    return _bisect(lambda z: gaussian_delta(1.0 / z, epsilon) <= delta, 1e-6, 1e6)


def clipped_rows(inputs: torch.Tensor, masks: Sequence[torch.Tensor], example_count: int, clip: float,
                 layer: str) -> tuple[torch.Tensor, int, bool]:
    """A layer input's real-token rows, each scaled to unit norm and weighted so that an example counts as at most
    ``clip`` tokens; how many examples were scaled down; and whether pads are surely excluded. Rows are attributed to examples by the attention mask
    (token inputs) or by the leading dimension (one row per example); any other layout cannot be clipped."""
    features = inputs.shape[-1]
    for mask in masks:
        if inputs.dim() >= 2 and tuple(inputs.shape[:-1]) == tuple(mask.shape):
            rows, example_of_row = inputs[mask], mask.nonzero()[:, 0]
            tokens, pads_excluded = mask.sum(dim=1), True
            break
    else:
        if inputs.dim() < 2 or inputs.shape[0] != example_count:
            raise PrivacyError(f"layer {layer!r}: its input of shape {tuple(inputs.shape)} cannot be told apart by "
                               "example, so its Gram cannot be clipped per example for differential privacy")
        per_example = inputs.reshape(example_count, -1, features)
        rows = per_example.reshape(-1, features)
        example_of_row = torch.arange(example_count, device=inputs.device).repeat_interleave(per_example.shape[1])
        tokens = torch.full((example_count,), per_example.shape[1], device=inputs.device)
        pads_excluded = inputs.dim() == 2  # one row per example; else every position, pads (if any) too
    rows = rows.to(torch.float64)
    weights = (clip / tokens.clamp(min=1).to(torch.float64)).clamp(max=1.0)
    norms = rows.norm(dim=1)
    scale = weights[example_of_row].sqrt() / torch.where(norms > 0, norms, torch.ones_like(norms))
    scale = torch.where(norms > 0, scale, torch.zeros_like(scale))
    clipped = int((tokens > clip).sum())
    return rows * scale.unsqueeze(1), clipped, pads_excluded


@dataclass(frozen=True)
class Release:
    """What a noisy statistics file says about its noise, kept in its metadata as ``privacy``."""

    epsilon: float
    delta: float
    clip: float
    noise_multiplier: float  # of the whole release: noise std / L2 sensitivity of all its Grams together
    noise_std: float  # of each packed Gram entry
    grams: int  # how many Grams the release holds (K)
    draw: str  # a random id of this noise draw: the budget ledger counts draws, not files
    accountant: str = ACCOUNTANT

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def clipped_record(clip: float) -> dict[str, Any]:
    """The ``privacy`` record of clipped statistics before any noise (noise standard deviation 0)."""
    return {"clip": clip, "noise_std": 0.0}


def privatise(stats: Any, spec: PrivacySpec) -> Release:
    """Noise the packed Grams of clipped statistics (:class:`fusion.statistics.GramStatistics` whose ``privacy`` is a
    :func:`clipped_record` of ``spec.clip``) in place, calibrated to ``spec`` over all of them at once."""
    record = stats.privacy or {}
    if record.get("noise_std") != 0.0 or record.get("clip") != spec.clip:
        raise PrivacyError(f"statistics clipped to {record.get('clip')} token(s), noise std "
                           f"{record.get('noise_std')}: only noise-free statistics clipped to {spec.clip} can be noised")
    release = add_noise(stats.grams, spec, stats.example_count)
    stats.privacy = release.as_dict()
    stats.settings["privacy"] = spec.request()
    return release


def add_noise(grams: dict[str, torch.Tensor], spec: PrivacySpec, example_count: int) -> Release:
    """Noise every packed Gram (clipped to ``spec.clip``) in place, calibrated to ``spec`` over all of them."""
    delta = spec.delta_for(example_count)
    multiplier = noise_multiplier(spec.epsilon, delta)
    std = multiplier * spec.clip * math.sqrt(2 * len(grams))  # replacement of one example: sqrt(2) clip per Gram
    generator = torch.Generator().manual_seed(spec.seed if spec.seed is not None else secrets.randbits(63))
    for key in sorted(grams):
        packed = grams[key]
        packed += std * torch.randn(packed.shape, dtype=torch.float64, generator=generator).to(packed.device)
    return Release(epsilon=spec.epsilon, delta=delta, clip=spec.clip, noise_multiplier=multiplier, noise_std=std,
                   grams=len(grams), draw=secrets.token_hex(8))


DISTRIBUTED = "distributed"  # run config dp-noise: each secure site adds a share of the noise (see NoiseShares)
DISTRIBUTED_MECHANISM = "analyze-gauss/replacement-2/distributed-1"


@dataclass(frozen=True)
class NoiseShares:
    """Distributed noise for one secure run: every site adds ``1 / threshold`` of the noise's variance to what it
    sends, so that the decoded sum over the survivors (never fewer than ``threshold``: no site unmasks for fewer)
    carries at least the whole noise that ``(epsilon, delta)`` needs, and n sites' sum ``n / threshold`` of it
    rather than the ``n`` times of local noise. The noise is fresh in every run: each run is a release and is charged
    to the site's budget.

    What is released is not only the Grams. A site's share of ``G_i`` alone is not private, so products with the
    weights cannot be formed from a noisy Gram (``G̃_i W_i^T`` would carry only the share's noise): every released
    tensor gets its own noise, calibrated to its sensitivity. Replacing one example moves a Gram by at most
    ``sqrt(2) clip`` (Frobenius), ``G W^T`` and ``diag(G) W^T`` by at most that times ``||W||_2``, which every site
    holds to the public ``weight_bound``. Over the ``releases`` noised tensors of the agreed layout together (one
    Gaussian mechanism, each tensor in units of its sensitivity) the noise multiplier is that of ``(epsilon,
    delta)``. The weights themselves (the weighted means) are outside the guarantee, as everywhere.

    ``seed`` is the site's secret for the run (its noise is the same in every round of the run); never sent."""

    epsilon: float
    delta: float
    clip: float
    weight_bound: float
    threshold: int
    releases: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.delta > 0.0:  # 1/N^2 differs by site: one noise for all needs one delta for all
            raise PrivacyError("distributed DP noise needs dp-delta set for the whole run (each site refuses one above "
                               f"1/N for its N examples), not {self.delta}")
        PrivacySpec(self.epsilon, self.delta, self.clip)  # the same checks as a site's own request
        if not (self.weight_bound > 0.0 and math.isfinite(self.weight_bound)):
            raise PrivacyError("distributed DP noise needs dp-weight-bound, a public bound on every merged layer's "
                               f"spectral norm (it calibrates the noise on G W^T), not {self.weight_bound}")
        if self.threshold < 1 or self.releases < 1:
            raise PrivacyError(f"distributed DP noise needs a threshold and a release count of at least 1, not "
                               f"{self.threshold} and {self.releases}")

    @property
    def noise_multiplier(self) -> float:
        return noise_multiplier(self.epsilon, self.delta)

    def std(self, units: float) -> float:
        """This site's noise standard deviation on a tensor of sensitivity ``units * sqrt(2) clip``."""
        whole = self.noise_multiplier * math.sqrt(self.releases) * math.sqrt(2.0) * self.clip * units
        return whole / math.sqrt(self.threshold)

    def public(self) -> dict[str, Any]:
        """What the request carries (and the report shows): all but the seed."""
        return {"epsilon": self.epsilon, "delta": self.delta, "clip": self.clip, "weight_bound": self.weight_bound,
                "mechanism": DISTRIBUTED_MECHANISM}

    def spending(self, draw: str) -> dict[str, Any]:
        """The budget entry of this run's release: the whole noise, as the fewest survivors (``threshold``) give."""
        return {"draw": draw, "noise_multiplier": self.noise_multiplier, "delta": self.delta, "epsilon": self.epsilon}

    def noise(self, key: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
        """The site's noise on ``key`` for this run: the same in every round, independent across keys."""
        digest = hashlib.sha256(f"{self.seed}/{key}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return std * torch.randn(shape, dtype=torch.float64, generator=generator)


def spectral_norm(weight: torch.Tensor) -> float:
    """``||W||_2``, exactly (the largest singular value): an estimate from below would under-noise."""
    return float(torch.linalg.matrix_norm(weight.detach().to(torch.float64), ord=2))


def noise_ridge(noise_variance: float, dim: int) -> float:
    """The ridge a noisy summed Gram is solved with: ``3 s sqrt(d)``, ``s^2`` the summed noise variance per entry.

    AdaSSP-style (Wang, 2018): the noise matrix's eigenvalues reach down to about ``-2 s sqrt(d)`` (Wigner), so
    adding that much to the diagonal makes the noisy Gram positive definite, and :data:`RIDGE_MARGIN` more keeps its
    smallest eigenvalue at about ``s sqrt(d)`` or above (where a draw's extreme eigenvalue goes further, the solve
    doubles the ridge until it factorises). Without the margin the smallest eigenvalue sits at the noise's edge,
    near zero in about every draw, and the solve divides the noise by it: measured, one layer of condition 5e4 took
    a federation of four sentiment owners from 0.76 to 0.58 accuracy at epsilon 0.5 (README). Directions where the
    owners' data is weaker than the noise are pulled towards the prior (the average)."""
    return (SPECTRAL_FACTOR + RIDGE_MARGIN) * math.sqrt(max(noise_variance, 0.0) * dim)
