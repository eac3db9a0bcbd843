"""Task arithmetic (Ilharco et al.): the base model plus the scaled sum of the owners' task vectors; with
``lines_beta``, scaled by depth as LiNeS does (:func:`._relative.depth_scalings`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import MergeContext, MergeMethod, MergeOutcome, OwnerState, register, weighted, weighted_means
from ._relative import absent_from_base_warnings, depth_scalings, split_by_base

DELTA = "delta/"


@register("task-arithmetic")
@dataclass
class TaskArithmetic(MergeMethod):
    scaling: float = 0.4  # lambda; the paper tunes it on held-out data, 0.3 to 0.5 being typical
    lines_beta: float = 0.0  # LiNeS: block l of L gets scaling + lines_beta (l - 1) / (L - 1); 0: one lambda

    needs_base = True
    contributes_relative_to_base = True
    combine_only = ("scaling", "lines_beta")

    def contribute(self, owner: OwnerState, context: MergeContext):
        relative, absolute = split_by_base(owner.params, context.base)
        contribution = weighted(absolute, 1.0)
        for name, value in relative.items():
            contribution[DELTA + name] = value - context.base[name]
        return contribution

    def combine(self, sums, context: MergeContext) -> MergeOutcome:
        merged = weighted_means(sums)
        # A group's sums hold a few blocks: the depth of each stack comes from the whole model (the base's names).
        scalings = depth_scalings(context.base, self.scaling, self.lines_beta)
        for key, delta in sums.items():
            if key.startswith(DELTA):
                name = key[len(DELTA) :]
                merged[name] = context.base[name].double() + scalings[name] * delta
        return MergeOutcome(merged, warnings=absent_from_base_warnings(sums))

