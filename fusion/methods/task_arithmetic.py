"""Task arithmetic (Ilharco et al.): the base model plus the scaled sum of the owners' task vectors."""

from __future__ import annotations

from dataclasses import dataclass

from . import MergeContext, MergeMethod, MergeOutcome, OwnerState, register, weighted, weighted_means
from ._relative import absent_from_base_warnings, split_by_base

DELTA = "delta/"


@register("task-arithmetic")
@dataclass
class TaskArithmetic(MergeMethod):
    scaling: float = 0.4  # lambda; the paper tunes it on held-out data, 0.3 to 0.5 being typical

    needs_base = True

    def contribute(self, owner: OwnerState, context: MergeContext):
        relative, absolute = split_by_base(owner.params, context.base)
        contribution = weighted(absolute, 1.0)
        for name, value in relative.items():
            contribution[DELTA + name] = value - context.base[name]
        return contribution

    def combine(self, sums, context: MergeContext) -> MergeOutcome:
        merged = weighted_means(sums)
        for key, delta in sums.items():
            if key.startswith(DELTA):
                name = key[len(DELTA) :]
                merged[name] = context.base[name].double() + self.scaling * delta
        return MergeOutcome(merged, warnings=absent_from_base_warnings(sums))

