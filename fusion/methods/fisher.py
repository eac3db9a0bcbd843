"""Fisher-weighted averaging (Matena & Raffel): each parameter averaged with its owners' diagonal Fisher as weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MergeError
from . import MergeContext, MergeMethod, MergeOutcome, OwnerState, register, weighted, weighted_means

FISHER = "fisher/"
WEIGHTED = "fisher-theta/"
# Below this total Fisher a parameter carries no information from any owner; it is averaged instead.
MIN_FISHER = 1e-30


@register("fisher")
@dataclass
class Fisher(MergeMethod):
    weighting: str = "sum"  # "sum": Fisher summed over examples; "equal": each owner's mean Fisher counts the same

    needs_statistics = True
    needs_fisher = True

    def __post_init__(self) -> None:
        if self.weighting not in ("sum", "equal"):
            raise ValueError(f"weighting must be 'sum' or 'equal', not {self.weighting!r}")

    def contribute(self, owner: OwnerState, context: MergeContext):
        stats = owner.statistics
        if stats is None or not stats.fisher:
            raise MergeError(f"owner {owner.name!r}: no Fisher in its statistics (run `gramfuse stats --fisher`)")
        scale = 1.0 if self.weighting == "sum" else 1.0 / max(stats.fisher_example_count, 1)
        contribution = weighted(owner.params, 1.0)
        for name, value in owner.params.items():
            fisher = stats.fisher.get(name)
            if fisher is None:
                continue
            fisher = fisher.to(torch.float64) * scale
            contribution[FISHER + name] = fisher
            contribution[WEIGHTED + name] = fisher * value.to(torch.float64)
        return contribution

    def combine(self, sums, context: MergeContext) -> MergeOutcome:
        merged = weighted_means(sums)
        for name in merged:
            if FISHER + name not in sums:
                continue
            total = sums[FISHER + name]
            informed = total > MIN_FISHER
            merged[name] = torch.where(informed, sums[WEIGHTED + name] / total.clamp_min(MIN_FISHER), merged[name])
        return MergeOutcome(merged)
