"""Merging: in memory over owner states, and over Hugging Face model folders carrying statistics files.

Owners are streamed: each is loaded, checked, turned into its contribution, added into the sums and dropped, so a
merge holds one owner's model and the sums whatever the number of owners.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    atomic_folder,
    check_finite,
    check_same_shapes,
    float_state,
    head_names,
    label_set,
    load_classifier,
    save_classifier,
)
from .errors import CompatibilityError, MergeError, StatisticsError
from .methods import MergeContext, MergeMethod, MergeOutcome, OwnerState, Sums
from .statistics import STATS_FILENAME, GramStatistics, load_statistics, read_metadata, weights_fingerprint

log = logging.getLogger("gramfuse")
REPORT_FILENAME = "gramfuse-merge.json"


def merge_states(
    owners: Iterable[OwnerState], method: MergeMethod, context: MergeContext | None = None, progress: Any = None
) -> MergeOutcome:
    """Merge owners given as parameter dicts (and statistics where the method needs them)."""
    context = context or MergeContext()
    sums = Sums()
    count = 0
    for owner in owners:
        check_owner(owner, method)
        if owner.statistics is not None:
            if not context.modules:
                context.modules = dict(owner.statistics.modules)
            if owner.statistics.gram_dtype == "float32":
                context.gram_dtype = "float32"
        sums.add(method.contribute(owner, context))
        count += 1
        if progress is not None:
            progress.update(1)
    if count == 0:
        raise MergeError("no owners to merge")
    return method.combine(sums, context)


def check_owner(owner: OwnerState, method: MergeMethod) -> None:
    check_finite(owner.name, owner.params)
    if (method.needs_statistics or method.needs_fisher) and owner.statistics is None:
        raise MergeError(f"owner {owner.name!r}: method {method.name!r} needs statistics, and it has none")
    if method.needs_fisher and not owner.statistics.fisher:
        raise MergeError(f"owner {owner.name!r}: method 'fisher' needs Fisher statistics (`gramfuse stats --fisher`)")


@dataclass
class FolderOwner:
    name: str
    path: Path
    label_set: tuple
    model_type: str
    stats_path: Path
    own_head: dict[str, torch.Tensor] = field(default_factory=dict)


def owner_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, made unique with their position where two owners' folders share a name."""
    names = [path.name or str(path) for path in paths]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def describe_owners(paths: Sequence[str | Path], method: MergeMethod) -> list[FolderOwner]:
    """Cheap checks of every owner before any heavy work: configs, model types, statistics headers."""
    from transformers import AutoConfig

    paths = [Path(p) for p in paths]
    owners = []
    for name, path in zip(owner_names(paths), paths):
        if not (path / "config.json").is_file():
            raise CompatibilityError(f"owner {name!r}: {path} is not a model folder (no config.json)")
        config = AutoConfig.from_pretrained(str(path))
        stats_path = path / STATS_FILENAME
        if method.needs_statistics or method.needs_fisher:
            read_metadata(stats_path)
        owners.append(FolderOwner(name, path, label_set(config), config.model_type, stats_path))
    first = owners[0]
    for owner in owners[1:]:
        if owner.model_type != first.model_type:
            raise CompatibilityError(
                f"owner {owner.name!r}: model type {owner.model_type!r} differs from owner {first.name!r}'s "
                f"{first.model_type!r}"
            )
    return owners


def _load_statistics(owner: FolderOwner, state: dict[str, torch.Tensor]) -> GramStatistics:
    try:
        stats = load_statistics(owner.stats_path)
    except StatisticsError as error:
        raise StatisticsError(f"owner {owner.name!r}: {error}") from error
    if stats.fingerprint != weights_fingerprint(state):
        raise StatisticsError(
            f"owner {owner.name!r}: {owner.stats_path} was made from other weights than those in {owner.path} "
            "(fingerprints differ); run `gramfuse stats` on this model again"
        )
    for module, info in stats.modules.items():
        if info.weight not in state:
            raise StatisticsError(f"owner {owner.name!r}: layer {module!r} in the statistics is not in the model")
    return stats


def _check_layout(owner: str, stats: GramStatistics, reference_owner: str, reference: GramStatistics) -> None:
    for module, info in stats.modules.items():
        other = reference.modules.get(module)
        if other is not None and other.gram != info.gram:
            raise CompatibilityError(
                f"owner {owner!r}: layer {module!r} shares the Gram of {info.gram!r}, but for owner "
                f"{reference_owner!r} that of {other.gram!r}"
            )


def _load_base(base_dir: str | Path | None) -> dict[str, torch.Tensor] | None:
    if base_dir is None:
        return None
    model, missing = load_classifier(base_dir, allow_missing=True)
    # Weights the base checkpoint lacks were initialised at random by transformers: they are no base at all.
    return {name: value for name, value in float_state(model).items() if name not in set(missing)}


def merge_folders(
    model_dirs: Sequence[str | Path],
    out_dir: str | Path,
    method: MergeMethod,
    *,
    base_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Merge owners' model folders (each with its statistics file) into ``out_dir``; returns the report.

    Owners sharing one label set give one merged model, head included. Otherwise each owner gets a folder
    ``out_dir/<owner>`` holding the merged body with its own head.
    """
    started = time.perf_counter()
    if len(model_dirs) < 1:
        raise MergeError("no model folders given")
    owners = describe_owners(model_dirs, method)
    shared_labels = len({owner.label_set for owner in owners}) == 1
    context = MergeContext(base=_load_base(base_dir))
    reference: dict[str, Any] = {}

    def states():
        for owner in owners:
            model, _ = load_classifier(owner.path)
            state = float_state(model)
            check_finite(owner.name, state)  # before the fingerprint: a NaN model is the clearer error
            head = set() if shared_labels else head_names(model)
            stats = _load_statistics(owner, state) if (method.needs_statistics or method.needs_fisher) else None
            params = {name: value for name, value in state.items() if name not in head}
            if not reference:
                reference.update(owner=owner.name, shapes={n: tuple(v.shape) for n, v in params.items()}, stats=stats)
            else:
                check_same_shapes(owner.name, params, reference["owner"], reference["shapes"])
                if stats is not None and reference["stats"] is not None:
                    _check_layout(owner.name, stats, reference["owner"], reference["stats"])
            owner.own_head = {name: state[name].clone() for name in head}
            log.info("owner %s: %s examples", owner.name, stats.example_count if stats else "?")
            yield OwnerState(owner.name, params, stats)

    outcome = merge_states(states(), method, context, progress)
    for warning in outcome.warnings:
        log.warning("%s", warning)
    report = {
        "method": method.name,
        "options": method.options(),
        "owners": [{"name": o.name, "path": str(o.path)} for o in owners],
        "shared_label_set": shared_labels,
        "layers": outcome.layers,
        "warnings": outcome.warnings,
    }
    with atomic_folder(out_dir, overwrite) as staging:
        if shared_labels:
            save_classifier(owners[0].path, outcome.params, staging)
            report["outputs"] = {owner.name: "." for owner in owners}
        else:
            for owner in owners:
                save_classifier(owner.path, {**outcome.params, **owner.own_head}, staging / owner.name)
            report["outputs"] = {owner.name: owner.name for owner in owners}
        report["seconds"] = round(time.perf_counter() - started, 3)
        (staging / REPORT_FILENAME).write_text(json.dumps(report, indent=2))
    return report
