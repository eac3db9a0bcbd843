"""Fixed-point encoding of float64 sums into 64-bit integers that add modulo 2^64.

Masks only cancel in a ring, so secure aggregation sums integers, not floats. Each tensor gets a public scale
``2^-fraction_bits``, the same for every owner, chosen from the largest magnitude any owner will add (found by the
``bounds`` round, see :mod:`federation.protocol`; an owner far above the others is held to an agreed bound instead,
:func:`agreed_band`) and the number of owners, so that the sum cannot overflow:
every encoded value is below ``2^(SUM_BITS - ceil(log2 owners))`` and the true sum below ``2^SUM_BITS``. A decoded
sum beyond that headroom means an owner broke the bound (or masks failed to cancel): an error, never a wrong merge.

Precision: the sum of a tensor is exact to ``2^-fraction_bits``, at worst ``2^-(SUM_BITS - BAND_BITS - log2 owners)``
of its largest entry: 2e-17 of it for eight owners.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from ..errors import GramfuseError

SUM_BITS = 61  # the sum stays below 2^61; anything decoded at or beyond 2^62 is an overflow
BAND_BITS = 2  # magnitudes are revealed (summed over owners) only to within a factor 4: see `magnitude_bands`
MIN_EXPONENT = -128  # smaller magnitudes are treated as 2^-128 (absolute precision far below float32's)
MAX_EXPONENT = 128
BANDS = (MAX_EXPONENT - MIN_EXPONENT) // BAND_BITS + 1
BOUND_FACTOR = 4.0**8  # the agreed bound: an owner's tensor may be at most this many times the owners' median one
ABOVE_BOUND = "above the bound agreed for it"  # what a site that cannot encode under the bound tells the server


class FixedPointError(GramfuseError):
    """A value does not fit the agreed fixed-point range, or a decoded sum overflowed."""


def magnitude_band(values: torch.Tensor) -> int:
    """The band ``b`` with ``max |values| < 2^(MIN_EXPONENT + BAND_BITS * b)``."""
    largest = float(values.detach().abs().max()) if values.numel() else 0.0
    if not math.isfinite(largest):
        raise FixedPointError("not finite")
    exponent = math.frexp(largest)[1] if largest > 0 else MIN_EXPONENT  # largest < 2^exponent
    if exponent > MAX_EXPONENT:
        raise FixedPointError(f"magnitude {largest:.3g} beyond 2^{MAX_EXPONENT}")
    return max(0, math.ceil((exponent - MIN_EXPONENT) / BAND_BITS))


def magnitude_bands(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """One-hot band of every tensor. Summed over owners (securely), this is a histogram per tensor: the server
    learns how many owners fall in each factor-of-4 band of magnitude, and which is the highest, not whose.
    Coarser bands would reveal less but cost precision: each band bit is a bit of the sum lost."""
    bands = {}
    for key, value in tensors.items():
        one_hot = np.zeros(BANDS, dtype=np.uint64)
        try:
            one_hot[magnitude_band(value)] = 1
        except FixedPointError as error:
            raise FixedPointError(f"tensor {key!r}: {error}",
                                  public=f"tensor {key!r}: not finite or beyond the largest magnitude encoded") from None
        bands[key] = one_hot
    return bands


def headroom_bits(owners: int) -> int:
    return max(0, math.ceil(math.log2(max(owners, 1))))


def bound_bands(factor: float) -> int | None:
    """A bound ``factor`` (above the median owner) in bands, rounded up; None (no bound) for 0 or infinity."""
    if factor == 0 or factor == math.inf:
        return None
    if not factor >= 1:
        raise ValueError(f"a bound factor must be at least 1 (or 0: none), not {factor}")
    return math.ceil(math.log(factor, 2**BAND_BITS) - 1e-9)


def agreed_band(band_histogram: np.ndarray, bands_above_median: int | None = bound_bands(BOUND_FACTOR)
                ) -> tuple[int, int]:
    """The highest band the scale of one tensor admits, and how many owners lie above it.

    The bound is ``bands_above_median`` above the owners' lower-median band (owners whose tensor is zero, band 0,
    left out), so that one owner who inflates its statistics sets neither the scale nor the merge: it cannot encode
    under the scale and drops out. The histogram says how many owners are above, never which. None: no bound,
    the highest owner sets the scale."""
    counts = np.asarray(band_histogram).astype(np.int64)
    used = np.flatnonzero(counts)
    top = int(used.max()) if used.size else 0
    owner_bands = np.repeat(np.arange(counts.size), np.maximum(counts, 0))
    owner_bands = owner_bands[owner_bands > 0]
    if bands_above_median is None or not owner_bands.size:
        return top, 0
    allowed = min(top, int(owner_bands[(owner_bands.size - 1) // 2]) + bands_above_median)
    return allowed, int(counts[allowed + 1:].sum())


def fraction_bits(band_histogram: np.ndarray, owners: int,
                  bands_above_median: int | None = bound_bands(BOUND_FACTOR)) -> int:
    """The public scale of one tensor from the summed one-hot bands of the owners who will add to it: fine enough
    for the highest band the bound admits (:func:`agreed_band`)."""
    top, _ = agreed_band(band_histogram, bands_above_median)
    return SUM_BITS - (MIN_EXPONENT + BAND_BITS * top) - headroom_bits(owners)


def encode(key: str, values: torch.Tensor, bits: int, owners: int) -> np.ndarray:
    """``round(values * 2^bits)`` as uint64 (two's complement), after checking it keeps the sum in range."""
    scaled = np.rint(np.ldexp(values.detach().to(torch.float64).reshape(-1).numpy(), bits))
    limit = 2.0 ** (SUM_BITS - headroom_bits(owners))
    beyond = np.flatnonzero(~(np.abs(scaled) <= limit))  # also catches NaN
    if beyond.size:
        raise FixedPointError(
            f"tensor {key!r}: value {values.reshape(-1)[int(beyond[0])].item():.6g} is beyond the range agreed for "
            f"it (2^{SUM_BITS - headroom_bits(owners) - bits:d}): this site's tensor is far larger than the other "
            f"owners' (or the statistics changed between rounds)",
            public=f"tensor {key!r}: a value is {ABOVE_BOUND} (the fixed-point range)",
        )
    return scaled.astype(np.int64).view(np.uint64)


def check_encodable(magnitudes: Mapping[str, float], scales: Mapping[str, int], owners: int) -> None:
    """Raise, as :func:`encode` would, where a tensor's largest magnitude does not encode under its scale: checked
    for every tensor before the first part of the sums, so that a site above the bound drops out there."""
    limit = 2.0 ** (SUM_BITS - headroom_bits(owners))
    for key, magnitude in magnitudes.items():
        if key in scales and not abs(math.ldexp(magnitude, scales[key])) <= limit:
            raise FixedPointError(f"tensor {key!r}: its largest value, {magnitude:.6g}, is beyond the range agreed for "
                                  f"it (2^{SUM_BITS - headroom_bits(owners) - scales[key]:d}): this site's tensor is "
                                  "far larger than the other owners'",
                                  public=f"tensor {key!r}: a value is {ABOVE_BOUND} (the fixed-point range)")


def decode(key: str, total: np.ndarray, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The float64 sum from the modular sum of the encodings; an overflowed sum is an error naming the tensor."""
    signed = np.asarray(total, dtype=np.uint64).view(np.int64)
    if signed.size and int(np.abs(signed.astype(np.float64)).max()) >= 2**62:
        raise FixedPointError(
            f"tensor {key!r}: the decoded sum overflowed the fixed-point range (an owner exceeded the agreed bound, "
            f"or masks did not cancel)"
        )
    return torch.from_numpy(np.ldexp(signed.astype(np.float64), -bits)).reshape(shape)
