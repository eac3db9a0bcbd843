"""RegMean++ (Nguyen et al., TMLR 2026): RegMean's closed form on Grams taken unit by unit through the already merged
model, so that they describe the inputs the merged model will see (:mod:`fusion.plusplus` gathers them).

Given those statistics, a unit is merged exactly as RegMean merges it: same contributions, same solve, same options.
What differs is where the statistics come from: the owners' data run through the merge as it is built, in the
merging process (``gramfuse merge --method regmean++ --data ...``), never a statistics file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import MergeError
from . import MergeContext, OwnerState, register
from .regmean import RegMean


@register("regmean++")
@dataclass
class RegMeanPlusPlus(RegMean):
    # The merge needs each owner's data in the merging process: its Grams depend on the merge itself.
    needs_data: ClassVar[bool] = True

    def contribute(self, owner: OwnerState, context: MergeContext):
        if not owner.statistics.settings.get("regmean++"):  # a statistics file's Grams: that would be plain RegMean
            raise MergeError(f"owner {owner.name!r}: regmean++ needs the Grams of its own pass through the merge "
                             "(merge_folders with the owners' data), not a statistics file's")
        return super().contribute(owner, context)
