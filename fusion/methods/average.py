"""Plain averages: every owner the same, or weighted by example count (one-shot FedAvg)."""

from __future__ import annotations

from dataclasses import dataclass

from . import MergeContext, MergeMethod, MergeOutcome, OwnerState, register, weighted, weighted_means


@register("average")
@dataclass
class Average(MergeMethod):
    def contribute(self, owner: OwnerState, context: MergeContext):
        return weighted(owner.params, 1.0)

    def combine(self, sums, context: MergeContext) -> MergeOutcome:
        return MergeOutcome(weighted_means(sums))


@register("weighted-average")
@dataclass
class WeightedAverage(MergeMethod):
    needs_statistics = True

    def contribute(self, owner: OwnerState, context: MergeContext):
        return weighted(owner.params, owner.example_count)

    def combine(self, sums, context: MergeContext) -> MergeOutcome:
        return MergeOutcome(weighted_means(sums))
