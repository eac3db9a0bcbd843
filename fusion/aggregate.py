"""Folding owners into running sums one at a time: the plaintext server's aggregation (of one part of the model at a
time), and in-memory merges (the offline merge of folders streams group by group instead, :mod:`fusion.merge`).

An owner is checked against the first one accepted (model type, shapes, the layout of shared Grams, the label set
where heads must be shared), its contributions are computed, and only then added; an owner that fails any check
is rejected with an error naming it, and nothing already aggregated changes. Every mode ends in the same
:func:`fusion.finish.finish`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_finite, check_same_shapes
from .errors import CompatibilityError, MergeError
from .finish import Group, Output, finish, plan_groups, plan_outputs, restrict
from .methods import MergeContext, MergeMethod, MergeOutcome, OwnerState, Sums
from .statistics import GramStatistics, check_layers

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


class Aggregator:
    """Running sums of whatever the owners send (a whole model, or the server's current part), folded one owner at a
    time.

    The body's sums are one set; each label set's heads are summed apart, so that the reference label set (the one
    most owners share, :func:`fusion.finish.reference_label_set`) is chosen once every owner is in, as in every
    other mode. Each owner's own head is kept too (heads are small).
    """

    def __init__(self, method: MergeMethod, context: MergeContext | None = None, heads: str = "auto") -> None:
        if heads not in HEADS:
            raise MergeError(f"heads must be one of {', '.join(HEADS)}, not {heads!r}")
        self.method = method
        self.context = context or MergeContext()
        self.heads = heads
        self.body = Sums()
        self.head_sums: dict[tuple, Sums] = {}
        self.owners: list[str] = []
        self.own_heads: dict[str, dict[str, torch.Tensor]] = {}
        self.configs: dict[str, Any] = {}
        self.label_sets: dict[str, tuple] = {}
        self._reference: OwnerUpdate | None = None
        self._shapes: dict[str, tuple] = {}
        self._names: list[str] = []  # the first owner's parameters, in order
        self._head: set[str] = set()
        self.dtypes: dict[str, torch.dtype] = {}
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
        body_part, head_part = contributions(self.method, owner, context, with_head=True)
        head_sums = self.head_sums.get(owner.label_set, Sums())
        self.body.check(body_part)
        head_sums.check(head_part)
        # Every check passed: from here on nothing can fail half-way.
        if self._reference is None:
            # Only what later checks read: holding the first owner's tensors would keep a whole reply in memory.
            self._reference = replace(owner, params={}, statistics=None)
            self._shapes = {n: tuple(v.shape) for n, v in body.items()}
            self._names = list(owner.params)
            self._head = set(owner.head)
            self.dtypes = {n: v.dtype for n, v in owner.params.items()}
            self._layout = dict(owner.statistics.modules) if owner.statistics is not None else {}
        self.context = context
        self.body.add(body_part)
        head_sums.add(head_part)
        self.head_sums[owner.label_set] = head_sums
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
        if stats is not None:
            check_layers(f"owner {owner.name!r}", stats, {name: tuple(v.shape) for name, v in owner.params.items()})
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

    def _check_combinable(self, method: MergeMethod) -> None:
        if method.sums_key() != self.method.sums_key():
            raise MergeError(f"{method.label()} cannot be combined from the sums of {self.method.label()}")
        if not self.owners:
            raise MergeError("no owners to merge")

    def outputs(self, order: list[str] | None = None) -> list[Output]:
        """The output folders, by the one rule of :func:`fusion.finish.plan_outputs` (``order``: owners by
        precedence, default the order they were folded in)."""
        order = order or self.owners
        heads = {name: head for name, head in self.own_heads.items() if head}
        return plan_outputs(order, self.label_sets, self.configs, heads)

    def sums_of(self, outputs: list[Output]):
        """``sums_of`` for :func:`fusion.finish.finish`: the whole-model sums restricted to a group."""
        reference = self.label_sets[outputs[0].owners[0]]

        def sums_of(method: MergeMethod, group: Group) -> Sums:
            return restrict(self.head_sums.get(reference, Sums()) if group.head else self.body, group)

        return sums_of

    def groups(self) -> list[Group]:
        return plan_groups(self._names, self._head, self.context.modules)

    def finish_into(self, roots: Mapping[str, Path], methods: list[MergeMethod], *, order: list[str] | None = None,
                    report: Mapping[str, Any], tokenizer: Any = None, progress: Any = None) -> dict[str, dict]:
        """Write every method's merge into its folder of ``roots`` (:func:`fusion.finish.finish`); returns the
        reports."""
        for method in methods:
            self._check_combinable(method)
        outputs = self.outputs(order)
        common = {**report, "shared_label_set": len(set(self.label_sets.values())) == 1}
        return finish(roots, methods, self.groups(), self.sums_of(outputs), self.context, outputs, self.dtypes,
                      report=common, tokenizer=tokenizer, progress=progress)

    def combined(self, method: MergeMethod | None = None) -> MergeOutcome:
        """The body's merge in memory, group by group as every merge goes (heads are the files' business)."""
        method = method or self.method
        self._check_combinable(method)
        outcome = MergeOutcome({})
        for group in self.groups():
            part = method.combine(restrict(self.body, group), self.context)
            outcome.params.update(part.params)
            outcome.layers.update(part.layers)
            outcome.warnings += [w for w in part.warnings if w not in outcome.warnings]
        return outcome


def context_with(context: MergeContext, stats: GramStatistics | None) -> MergeContext:
    """``context`` completed by an owner's statistics: the layer layout, and the least precise Gram dtype."""
    context = replace(context, modules=dict(context.modules))
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

