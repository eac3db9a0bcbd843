"""Merging: in memory over owner states, and over Hugging Face model folders carrying statistics files.

Owners are streamed through an :class:`~fusion.aggregate.Aggregator`: each is loaded, checked, folded into the sums
and dropped, so a merge holds one owner's model and the sums whatever the number of owners.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .aggregate import Aggregator, Merged, OwnerUpdate, owner_update
from .checkpoint import atomic_folder, check_finite, float_state, load_classifier, save_classifier, tokenizer_or_none
from .errors import CompatibilityError, MergeError, StatisticsError
from .methods import MergeContext, MergeMethod, MergeOutcome, OwnerState
from .statistics import STATS_FILENAME, GramStatistics, load_statistics, read_metadata, weights_fingerprint

log = logging.getLogger("gramfuse")
REPORT_FILENAME = "gramfuse-merge.json"


def merge_states(
    owners: Iterable[OwnerState], method: MergeMethod, context: MergeContext | None = None, progress: Any = None
) -> MergeOutcome:
    """Merge owners given as parameter dicts (and statistics where the method needs them); no heads, no files."""
    aggregator = Aggregator(method, context)
    for owner in owners:
        aggregator.add(OwnerUpdate(owner.name, dict(owner.params), set(), (), "", owner.statistics))
        if progress is not None:
            progress.update(1)
    merged = aggregator.result()
    return MergeOutcome(merged.outputs["."], merged.layers, merged.warnings)


def owner_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, made unique with their position where two owners' folders share a name."""
    names = [path.name or str(path) for path in paths]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def check_folders(paths: Sequence[Path], method: MergeMethod) -> list[str]:
    """Cheap checks of every owner before any heavy work: model folders, model types, statistics headers."""
    from transformers import AutoConfig

    names = owner_names(paths)
    model_types = {}
    for name, path in zip(names, paths):
        if not (path / "config.json").is_file():
            raise CompatibilityError(f"owner {name!r}: {path} is not a model folder (no config.json)")
        model_types[name] = AutoConfig.from_pretrained(str(path)).model_type
        if method.needs_statistics or method.needs_fisher:
            try:
                read_metadata(path / STATS_FILENAME)
            except StatisticsError as error:
                raise StatisticsError(f"owner {name!r}: {error}") from error
    first = names[0]
    for name in names[1:]:
        if model_types[name] != model_types[first]:
            raise CompatibilityError(
                f"owner {name!r}: model type {model_types[name]!r} differs from owner {first!r}'s "
                f"{model_types[first]!r}"
            )
    return names


def folder_statistics(name: str, path: Path, state: Mapping) -> GramStatistics:
    """An owner folder's statistics, checked to have been made from exactly the weights in the folder."""
    stats_path = path / STATS_FILENAME
    try:
        stats = load_statistics(stats_path)
    except StatisticsError as error:
        raise StatisticsError(f"owner {name!r}: {error}") from error
    if stats.fingerprint != weights_fingerprint(state):
        raise StatisticsError(
            f"owner {name!r}: {stats_path} was made from other weights than those in {path} "
            "(fingerprints differ); run `gramfuse stats` on this model again"
        )
    for module, info in stats.modules.items():
        if info.weight not in state:
            raise StatisticsError(f"owner {name!r}: layer {module!r} in the statistics is not in the model")
    return stats


def load_base(base_dir: str | Path | None) -> dict | None:
    if base_dir is None:
        return None
    model, missing = load_classifier(base_dir, allow_missing=True)
    # Weights the base checkpoint lacks were initialised at random by transformers: they are no base at all.
    return {name: value for name, value in float_state(model).items() if name not in set(missing)}


def merge_report(method: MergeMethod, merged: Merged, owners: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "method": method.name,
        "options": method.options(),
        "owners": owners,
        "shared_label_set": merged.shared_head,
        "outputs": {name: name for name in merged.outputs},
        "layers": merged.layers,
        "warnings": merged.warnings,
    }


def write_merged(
    out_dir: str | Path,
    merged: Merged,
    tokenizers: Mapping[str, Any],
    report: dict[str, Any],
    overwrite: bool,
    extra_files: Mapping[str, dict] | None = None,
) -> None:
    """Every output folder and the report (and ``extra_files``, JSON), all at once or not at all."""
    with atomic_folder(out_dir, overwrite) as staging:
        write_outputs(staging, merged, tokenizers, report)
        for filename, content in (extra_files or {}).items():
            (staging / filename).write_text(json.dumps(content, indent=2))


def write_outputs(folder: Path, merged: Merged, tokenizers: Mapping[str, Any], report: dict[str, Any]) -> None:
    """The merged model folder(s) and ``gramfuse-merge.json`` into an existing ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, params in merged.outputs.items():
        save_classifier(merged.configs[name], params, tokenizers.get(name), folder / name if name != "." else folder)
    (folder / REPORT_FILENAME).write_text(json.dumps(report, indent=2))


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
    paths = [Path(p) for p in model_dirs]
    if not paths:
        raise MergeError("no model folders given")
    names = check_folders(paths, method)
    aggregator = Aggregator(method, MergeContext(base=load_base(base_dir)))
    needs_statistics = method.needs_statistics or method.needs_fisher
    for name, path in zip(names, paths):
        model, _ = load_classifier(path)
        state = float_state(model)
        check_finite(name, state)  # before the fingerprint: NaN weights are the clearer error
        stats = folder_statistics(name, path, state) if needs_statistics else None
        aggregator.add(owner_update(name, model, stats))
        log.info("owner %s: %s examples", name, stats.example_count if stats else "?")
        if progress is not None:
            progress.update(1)
    merged = aggregator.result()
    for warning in merged.warnings:
        log.warning("%s", warning)
    report = merge_report(method, merged, [{"name": n, "path": str(p)} for n, p in zip(names, paths)])
    tokenizer_of = dict(zip(names, paths))
    tokenizers = {out: tokenizer_or_none(tokenizer_of[out] if out != "." else paths[0]) for out in merged.outputs}
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_merged(out_dir, merged, tokenizers, report, overwrite)
    return report
