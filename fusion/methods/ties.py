"""TIES-merging (Yadav et al.): trim each task vector, elect a sign per entry, average the agreeing entries.

All three steps are additive once trimming is done at the owner: the elected sign is that of the sum of trimmed
task vectors, and the disjoint mean is the sum of the entries of that sign over their count. So the owners'
contributions are the positive and negative parts and their counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import MergeContext, MergeMethod, MergeOutcome, OwnerState, register, weighted, weighted_means
from ._relative import absent_from_base_warnings, depth_scalings, split_by_base

POSITIVE, NEGATIVE = "positive/", "negative/"
POSITIVE_COUNT, NEGATIVE_COUNT = "positive-count/", "negative-count/"


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly ``k = max(1, int(density * n))`` entries of largest magnitude and zero the rest, mergekit's rule
    (k rounded down, at least one). Among entries tied at the k-th magnitude, those ``torch.topk`` picks are kept:
    a threshold (keep every entry >= the k-th) would keep more than k wherever magnitudes tie."""
    count = delta.numel()
    keep = max(1, int(density * count))
    if keep >= count:
        return delta
    flat = delta.flatten()
    kept = torch.topk(flat.abs(), keep, sorted=False).indices
    trimmed = torch.zeros_like(flat)
    trimmed[kept] = flat[kept]
    return trimmed.view_as(delta)


@register("ties")
@dataclass
class Ties(MergeMethod):
    density: float = 0.2  # fraction of each task vector kept (the paper's k = 20%)
    scaling: float = 1.0  # lambda applied to the merged task vector
    lines_beta: float = 0.0  # LiNeS: block l of L gets scaling + lines_beta (l - 1) / (L - 1); 0: one lambda

    needs_base = True
    contributes_relative_to_base = True
    combine_only = ("scaling", "lines_beta")

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], not {self.density}")

    def contribute(self, owner: OwnerState, context: MergeContext):
        relative, absolute = split_by_base(owner.params, context.base)
        contribution = weighted(absolute, 1.0)
        for name, value in relative.items():
            delta = trim(value - context.base[name].to(torch.float64), self.density)
            contribution[POSITIVE + name] = delta.clamp_min(0.0)
            contribution[NEGATIVE + name] = delta.clamp_max(0.0)
            contribution[POSITIVE_COUNT + name] = (delta > 0).to(torch.float64)
            contribution[NEGATIVE_COUNT + name] = (delta < 0).to(torch.float64)
        return contribution

    def combine(self, sums, context: MergeContext) -> MergeOutcome:
        merged = weighted_means(sums)
        # A group's sums hold a few blocks: the depth of each stack comes from the whole model (the base's names).
        scalings = depth_scalings(context.base, self.scaling, self.lines_beta)
        for key in sums:
            if not key.startswith(POSITIVE):
                continue
            name = key[len(POSITIVE) :]
            positive, negative = sums[POSITIVE + name], sums[NEGATIVE + name]
            elected = positive + negative
            delta = torch.where(
                elected > 0,
                positive / sums[POSITIVE_COUNT + name].clamp_min(1.0),
                torch.where(elected < 0, negative / sums[NEGATIVE_COUNT + name].clamp_min(1.0), 0.0),
            )
            merged[name] = context.base[name].double() + scalings[name] * delta
        return MergeOutcome(merged, warnings=absent_from_base_warnings(sums))
