"""The one finish of every merge: sums in, loadable model folders and a report out.

The offline merge, the plaintext server and the secure server differ only in how the sums were formed. All three
end here, and all three stream: a merge is a sequence of independent *groups* (one shared Gram with the layers it
feeds, or one averaged tensor); each group's sums are asked for, combined by the method, cast to the checkpoint's
own dtype and written to the output shards, then dropped. Peak memory is one group's float64 sums and one output
shard, whatever the model's depth and the number of owners (where the sums are formed group by group too).

One rule for heads in every mode (:func:`plan_outputs`): the *reference* label set is the one most owners share
(ties: the earliest owner's). Its owners' heads are merged with the body. Every other owner whose head is known gets
a folder of its own, ``<owner>/``, with the merged body and its own head.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import DEFAULT_SHARD_BYTES, ShardWriter
from .errors import MergeError
from .methods import MergeContext, MergeMethod, Sums
from .solve import CONDITION_ESTIMATE
from .statistics import ModuleInfo

log = logging.getLogger("gramfuse.merge")
REPORT_FILENAME = "gramfuse-merge.json"
MERGED = "."


@dataclass(frozen=True)
class Group:
    """Parameters merged together: the layers fed one Gram, or one averaged tensor."""

    name: str
    tensors: tuple[str, ...]
    head: bool = False  # parameters of the task head, merged among the reference label set's owners only
    gram: str | None = None
    modules: tuple[str, ...] = ()

    @property
    def keys(self) -> frozenset[str]:
        """The names a sum of this group carries after its prefix (``mean/<tensor>``, ``gram/<key>``, …)."""
        return frozenset(self.tensors) | frozenset(self.modules) | ({self.gram} if self.gram else frozenset())


def plan_groups(names: Sequence[str], head: set[str], modules: Mapping[str, ModuleInfo]) -> list[Group]:
    """The groups of a model whose floating-point parameters are ``names`` (in checkpoint order)."""
    position = {name: index for index, name in enumerate(names)}
    by_gram: dict[tuple[str, bool], list[str]] = {}
    for module, info in modules.items():
        if info.weight in position:
            by_gram.setdefault((info.gram, info.weight in head), []).append(module)
    groups, grouped = [], set()
    for (gram, in_head), members in by_gram.items():
        tensors = tuple(modules[m].weight for m in members)
        groups.append(Group(gram, tensors, in_head, gram, tuple(members)))
        grouped.update(tensors)
    groups += [Group(name, (name,), name in head) for name in names if name not in grouped]
    return sorted(groups, key=lambda group: min(position[t] for t in group.tensors))


def restrict(sums: Mapping[str, torch.Tensor], group: Group) -> Sums:
    """The part of whole-model sums that ``group`` needs (owner-wide scalars such as the weight total included)."""
    keys = group.keys
    return Sums({key: value for key, value in sums.items() if "/" not in key or key.split("/", 1)[1] in keys})


@dataclass
class Output:
    """One loadable model folder: ``"."`` or an owner's name, the owners it serves, and its head."""

    folder: str
    owners: list[str]
    config: Any
    own_head: Mapping[str, torch.Tensor] | None = None  # an owner's own head; None: the merged head


def reference_label_set(label_sets: Sequence[tuple]) -> tuple:
    """The label set most owners share; on a tie, the earliest owner's. ``label_sets`` in owner order."""
    if not label_sets:
        raise MergeError("no owners to merge")
    counts = {labels: label_sets.count(labels) for labels in label_sets}
    return max(counts, key=lambda labels: (counts[labels], -label_sets.index(labels)))


def plan_outputs(order: Sequence[str], label_sets: Mapping[str, tuple], configs: Mapping[str, Any],
                 own_heads: Mapping[str, Mapping[str, torch.Tensor]], reference: tuple | None = None) -> list[Output]:
    """The output folders: the reference label set's merged model, and one per other owner whose head is known.

    ``reference`` is the label set whose heads were summed (default: :func:`reference_label_set` of ``order``). A
    reference label set held by a single owner whose head is known gives that owner's folder, not ``"."``: there
    is nothing to merge its head with.
    """
    if reference is None:
        reference = reference_label_set([label_sets[name] for name in order])
    members = [name for name in order if label_sets[name] == reference]
    first = members[0]
    if len(members) == 1 and len(order) > 1 and first in own_heads:
        outputs = [Output(first, [first], configs[first], own_heads[first])]
    else:
        outputs = [Output(MERGED, members, configs[first])]
    for name in order:
        if label_sets[name] != reference:
            if name in own_heads:
                outputs.append(Output(name, [name], configs[name], own_heads[name]))
            else:
                log.info("owner %s keeps its own head (not sent): no folder of its own", name)
    return outputs


@dataclass
class _MethodReport:
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


SumsOf = Callable[[MergeMethod, Group], Mapping[str, torch.Tensor]]


def method_roots(staging: Path, methods: Sequence[MergeMethod]) -> dict[str, Path]:
    """Where each method's merge goes: ``staging`` for one method, ``staging/<method label>`` for several."""
    return {m.label(): staging if len(methods) == 1 else staging / m.label() for m in methods}


class Finisher:
    """The finish, fed in parts: :meth:`add` combines and writes groups as their sums become available (all at once
    offline; chunk by chunk where the server asks the sites for a few layers at a time); :meth:`close` writes the
    own heads, configs, tokenizer and reports. ``outputs`` may get their ``own_head`` until :meth:`close`."""

    def __init__(self, roots: Mapping[str, Path], methods: Sequence[MergeMethod], context: MergeContext,
                 outputs: Sequence[Output], dtypes: Mapping[str, torch.dtype], *, tokenizer: Any = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Any = None,
                 on_merged: Callable[[str, Mapping[str, torch.Tensor]], None] | None = None) -> None:
        self.roots, self.methods, self.context, self.outputs = roots, list(methods), context, list(outputs)
        self.dtypes, self.tokenizer, self.progress = dtypes, tokenizer, progress
        self.on_merged = on_merged  # called with each method's label and merged tensors, group by group
        self.writers = {(label, out.folder): ShardWriter(root if out.folder == MERGED else root / out.folder,
                                                         max_shard_bytes)
                        for label, root in roots.items() for out in self.outputs}
        self.reports = {label: _MethodReport() for label in roots}

    def add(self, groups: Sequence[Group], sums_of: SumsOf) -> None:
        """Combine and write ``groups``; ``sums_of(method, group)`` is called once per group and set of sums."""
        merged_head = any(out.own_head is None for out in self.outputs)
        for group in groups:
            if not (group.head and not merged_head):
                self._add_group(group, sums_of)
            if self.progress is not None:
                self.progress.update(1)

    def _add_group(self, group: Group, sums_of: SumsOf) -> None:
        started = time.perf_counter()
        sums_by_key: dict[tuple, Mapping[str, torch.Tensor]] = {}
        for method in self.methods:
            key = method.sums_key()
            if key not in sums_by_key:
                sums_by_key[key] = sums_of(method, group)
            params = _combine(method, group, sums_by_key[key], self.context, self.reports[method.label()])
            if self.on_merged is not None:
                self.on_merged(method.label(), params)
            for out in self.outputs:
                if not (group.head and out.own_head is not None):
                    self.writers[method.label(), out.folder].add({n: v.to(self.dtypes[n]) for n, v in params.items()})
        if group.gram is not None:
            seconds = time.perf_counter() - started  # the group's sums (reading, contributions) and its solves
            for parts in self.reports.values():
                if group.gram in parts.layers:
                    parts.layers[group.gram]["seconds"] = round(seconds, 3)
            log.info("group %s solved: %d layers, %.2f s", group.name, len(group.modules), seconds)

    def close(self, report: Mapping[str, Any], copied: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict]:
        """Own heads, ``copied`` tensors (integer buffers), configs, tokenizer and each method's
        ``gramfuse-merge.json`` (with ``report``: what every method's report also says); returns the reports."""
        for (label, folder), writer in self.writers.items():
            out = next(o for o in self.outputs if o.folder == folder)
            if out.own_head is not None:
                writer.add({name: out.own_head[name] for name in out.own_head})
            writer.add(copied or {})
            writer.close()
            out.config.save_pretrained(str(writer.folder))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(writer.folder))
        results = {m.label(): _report(m, self.outputs, self.reports[m.label()], report) for m in self.methods}
        for label, root in self.roots.items():
            write_report(root, results[label])
        return results


def finish(
    roots: Mapping[str, Path],
    methods: Sequence[MergeMethod],
    groups: Sequence[Group],
    sums_of: SumsOf,
    context: MergeContext,
    outputs: Sequence[Output],
    dtypes: Mapping[str, torch.dtype],
    *,
    report: Mapping[str, Any],
    tokenizer: Any = None,
    copied: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Any = None,
) -> dict[str, dict[str, Any]]:
    """Combine every group's sums with every method and write the outputs; returns the reports.

    ``sums_of(method, group)`` gives the group's sums (called once per group and distinct set of sums); ``dtypes``
    the dtype each parameter is saved in; ``copied`` tensors written as they are (integer buffers); ``report``
    what every method's report also says (owners, whether they share a label set). Each method writes into its
    folder of ``roots`` (:func:`method_roots`), with its ``gramfuse-merge.json``.
    """
    finisher = Finisher(roots, methods, context, outputs, dtypes, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes,
                        progress=progress)
    finisher.add(groups, sums_of)
    return finisher.close(report, copied)


def write_report(folder: Path, report: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_FILENAME).write_text(json.dumps(report, indent=2))


def _combine(method: MergeMethod, group: Group, sums: Mapping[str, torch.Tensor], context: MergeContext,
             report: _MethodReport) -> dict[str, torch.Tensor]:
    outcome = method.combine(sums, context)
    report.layers.update(outcome.layers)
    report.warnings += [warning for warning in outcome.warnings if warning not in report.warnings]
    missing = [name for name in group.tensors if name not in outcome.params]
    if missing:
        raise MergeError(f"{method.label()}: the merge produced no {missing[0]!r} (no owner contributed it?)")
    return {name: outcome.params[name] for name in group.tensors}


def _report(method: MergeMethod, outputs: Sequence[Output], parts: _MethodReport, common: Mapping[str, Any]) -> dict:
    for warning in parts.warnings:
        log.warning("%s: %s", method.label(), warning)
    return {
        "method": method.name,
        "options": method.options(),
        **common,
        "outputs": {out.folder: out.owners for out in outputs},
        "layers": parts.layers,
        **({"condition_estimate": CONDITION_ESTIMATE} if parts.layers else {}),
        "warnings": parts.warnings,
    }
