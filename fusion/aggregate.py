"""Folding owners into running sums one at a time: the one aggregation path of the offline merge and the server.

An owner is checked against the first one accepted (model type, shapes, the layout of shared Grams, the label set
where heads must be shared), its contributions are computed, and only then added; an owner that fails any check
is rejected with an error naming it, and nothing already aggregated changes.

Heads: the body's contributions go into one set of sums; the head's (the parameters outside the pretrained body)
into a second set for the first owner's label set, and each owner's own head is kept (heads are small). If every
owner shares that label set the merged model has a merged head; otherwise each owner gets the merged body with its
own head, as with ``gramfuse merge``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .checkpoint import check_finite, check_same_shapes
from .errors import CompatibilityError, MergeError
from .methods import MergeContext, MergeMethod, MergeOutcome, OwnerState, Sums
from .statistics import GramStatistics

HEADS = ("auto", "shared")


@dataclass
class OwnerUpdate:
    """Everything one owner brings: its floating-point weights, which of them are its head, and its statistics."""

    name: str
    params: dict[str, torch.Tensor]
    head: set[str]
    label_set: tuple
    model_type: str
    statistics: GramStatistics | None = None
    config: Any = None  # the owner's transformers config, to write its own folder when heads differ

    def split(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(body, head)`` parameters."""
        body = {n: v for n, v in self.params.items() if n not in self.head}
        return body, {n: v for n, v in self.params.items() if n in self.head}


@dataclass
class Merged:
    """The merge result: one parameter set per output (a single ``"."`` when every owner shares one model)."""

    outputs: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, Any]
    shared_head: bool
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Aggregator:
    def __init__(self, method: MergeMethod, context: MergeContext | None = None, heads: str = "auto") -> None:
        if heads not in HEADS:
            raise MergeError(f"heads must be one of {', '.join(HEADS)}, not {heads!r}")
        self.method = method
        self.context = context or MergeContext()
        self.heads = heads
        self.body = Sums()
        self.head = Sums()
        self.owners: list[str] = []
        self.own_heads: dict[str, dict[str, torch.Tensor]] = {}
        self.configs: dict[str, Any] = {}
        self.label_sets: dict[str, tuple] = {}
        self._reference: OwnerUpdate | None = None
        self._shapes: dict[str, tuple] = {}
        self._layout: dict[str, Any] = {}  # the first owner's module -> Gram map

    def check(self, owner: OwnerUpdate) -> None:
        """Raise the error :meth:`add` would raise for ``owner`` before computing anything."""
        if owner.name in self.owners:
            raise MergeError(f"owner {owner.name!r}: already aggregated")
        check_finite(owner.name, owner.params)
        self._check_fits(owner)

    def add(self, owner: OwnerUpdate) -> None:
        """Check ``owner``, then fold it in; on any error nothing changes."""
        self.check(owner)
        self.fold(owner)

    def fold(self, owner: OwnerUpdate) -> None:
        """Fold in an owner that :meth:`check` has passed (the server checks it against every aggregation first)."""
        body, head = owner.split()
        context = context_with(self.context, owner.statistics)
        in_reference = self._reference is None or owner.label_set == self._reference.label_set
        body_part, head_part = contributions(self.method, owner, context, with_head=in_reference)
        self.body.check(body_part)
        self.head.check(head_part)
        # Every check passed: from here on nothing can fail half-way.
        if self._reference is None:
            # Only what later checks read: holding the first owner's tensors would keep a whole reply in memory.
            self._reference = replace(owner, params={}, statistics=None)
            self._shapes = {n: tuple(v.shape) for n, v in body.items()}
            self._layout = dict(owner.statistics.modules) if owner.statistics is not None else {}
        self.context = context
        self.body.add(body_part)
        self.head.add(head_part)
        self.owners.append(owner.name)
        self.own_heads[owner.name] = {n: v.detach().clone() for n, v in head.items()}
        self.configs[owner.name] = owner.config
        self.label_sets[owner.name] = owner.label_set

    def _check_fits(self, owner: OwnerUpdate) -> None:
        method = self.method
        stats = owner.statistics
        if (method.needs_statistics or method.needs_fisher) and stats is None:
            raise MergeError(f"owner {owner.name!r}: method {method.name!r} needs statistics, and it has none")
        if method.needs_fisher and not stats.fisher:
            raise MergeError(f"owner {owner.name!r}: method 'fisher' needs Fisher statistics (`gramfuse stats --fisher`)")
        reference = self._reference
        if reference is None:
            return
        if owner.model_type != reference.model_type:
            raise CompatibilityError(
                f"owner {owner.name!r}: model type {owner.model_type!r} differs from owner {reference.name!r}'s "
                f"{reference.model_type!r}"
            )
        check_same_shapes(owner.name, owner.split()[0], reference.name, self._shapes)
        if owner.label_set != reference.label_set and self.heads == "shared":
            raise CompatibilityError(
                f"owner {owner.name!r}: label set {[label for _, label in owner.label_set]} does not fit "
                f"{[label for _, label in reference.label_set]} of owner {reference.name!r} (heads are shared)"
            )
        if stats is not None:
            for module, info in stats.modules.items():
                other = self._layout.get(module)
                if other is not None and other.gram != info.gram:
                    raise CompatibilityError(
                        f"owner {owner.name!r}: layer {module!r} shares the Gram of {info.gram!r}, but for owner "
                        f"{reference.name!r} that of {other.gram!r}"
                    )

    def result(self, method: MergeMethod | None = None) -> Merged:
        """The merge; ``method`` may differ from the aggregated one in its ``combine_only`` options (alpha)."""
        method = method or self.method
        if method.sums_key() != self.method.sums_key():
            raise MergeError(f"{method.label()} cannot be combined from the sums of {self.method.label()}")
        if not self.owners:
            raise MergeError("no owners to merge")
        body = method.combine(self.body, self.context)
        reference_labels = self._reference.label_set
        shared_head = all(labels == reference_labels for labels in self.label_sets.values())
        merged = Merged({}, {}, shared_head, dict(body.layers), list(body.warnings))
        if shared_head:
            head = method.combine(self.head, self.context) if self.head else MergeOutcome({})
            merged.layers.update(head.layers)
            merged.warnings += head.warnings
            merged.outputs["."] = {**body.params, **head.params}
            merged.configs["."] = self.configs[self.owners[0]]
        else:
            for name in self.owners:
                merged.outputs[name] = {**body.params, **self.own_heads[name]}
                merged.configs[name] = self.configs[name]
        return merged


def context_with(context: MergeContext, stats: GramStatistics | None) -> MergeContext:
    """``context`` completed by an owner's statistics: the layer layout, and the least precise Gram dtype."""
    context = MergeContext(context.base, dict(context.modules), context.gram_dtype)
    if stats is not None:
        if not context.modules:
            context.modules = dict(stats.modules)
        if stats.gram_dtype == "float32":
            context.gram_dtype = "float32"
    return context


def contributions(method: MergeMethod, owner: OwnerUpdate, context: MergeContext,
                  with_head: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What ``owner`` adds to the body's sums and (``with_head``: its label set is the merged one) the head's."""
    body, head = owner.split()
    body_part = method.contribute(OwnerState(owner.name, body, owner.statistics), context)
    head_part = method.contribute(OwnerState(owner.name, head, owner.statistics), context) if (
        head and with_head) else {}
    return body_part, head_part


def owner_update(name: str, model: Any, statistics: GramStatistics | None) -> OwnerUpdate:
    """An :class:`OwnerUpdate` from a loaded Hugging Face classifier."""
    from .checkpoint import float_state, head_names, label_set

    return OwnerUpdate(
        name=name,
        params=float_state(model),
        head=head_names(model),
        label_set=label_set(model.config),
        model_type=model.config.model_type,
        statistics=statistics,
        config=model.config,
    )

