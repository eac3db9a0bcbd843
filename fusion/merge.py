"""Merging: in memory over owner states, and streamed over Hugging Face model folders carrying statistics files.

A merge of folders never holds a whole owner. Every owner is first checked from its files' headers and metadata
(architecture, shapes, the layout of its statistics), then its weights are read once, tensor by tensor, to check
them (finite, and the very weights its statistics were computed from). Then the merge runs group by group
(:mod:`fusion.finish`): for each shared Gram with its layers, or each averaged tensor, every owner's tensors are
read, turned into contributions, added, and the group is combined and written. Peak memory: one group's float64
sums and one output shard, flat in the model's depth and in the number of owners.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .aggregate import Aggregator, OwnerUpdate
from .checkpoint import (
    DEFAULT_SHARD_BYTES,
    atomic_folder,
    check_apart,
    check_same_shapes,
    float_state,
    folder_tokenizer,
    head_names,
    label_set,
    load_model,
    missing_weights_message,
    missing_from,
    model_skeleton,
    quiet_transformers,
    resolve_device,
    tokenizer_or_none,
)
from .errors import CompatibilityError, GramfuseError, MergeError, StatisticsError
from .finite import all_finite
from .finish import Group, finish, plan_groups, plan_outputs, write_report
from .adapters import AdapterFiles, checkpoint_files, is_adapter, model_folder
from .lazy import CheckpointFiles, Restricted
from .methods import MergeContext, MergeMethod, MergeOutcome, OwnerState, Sums
from .methods.regmean import needs_diagonal
from .gram import linear_modules
from .statistics import STATS_FILENAME, GramStatistics, check_layers, open_statistics
from .sumsfile import (LedgerEntry, SumsFileError, SumsFolder, SumsMeta, SumsWriter, check_method_fits,
                       contribution_settings, warn_if_redrawn)

log = logging.getLogger("gramfuse")


def common_base(owners: Sequence[FolderOwner], needed: bool) -> Path | None:
    """The base model of adapter owners, which must share it (or None where no owner is an adapter)."""
    bases = {owner.files.adapter.base.resolve() for owner in owners if isinstance(owner.files, AdapterFiles)}
    if len(bases) > 1:
        raise CompatibilityError(f"the adapter owners name different base models ({', '.join(map(str, sorted(bases)))});"
                                 " give --base BASE_DIR if they are the same model")
    if not bases and needed:
        raise MergeError("the merge (task vectors, or --lora-rank) works relative to a base model: give --base BASE_DIR")
    return next(iter(bases), None)


def write_lora(folder: Path, base_dir: Path, modules: Mapping, rank: int) -> dict[str, Any]:
    """``folder/lora``: a peft LoRA adapter of rank ``rank`` of the merged model in ``folder`` against the base, for
    every layer some owner's statistics hooked (a tied head excepted); returns its report (error per layer)."""
    from safetensors.torch import save_file

    from .adapters import ADAPTER_CONFIG, ADAPTER_FILE, lora_of_merge

    merged, base = CheckpointFiles(folder), CheckpointFiles(base_dir)
    layers = {module: info.kind for module, info in modules.items() if not info.tied_to(module)}
    tensors, errors = {}, {}
    for module, kind in layers.items():  # one layer at a time: two weights and their SVD in memory
        name = module + ".weight"
        if name not in base:
            raise MergeError(f"--lora-rank: the base {base_dir} has no {name!r} (a bare body: give the owners' base)")
        parts, error = lora_of_merge(base.read([name]), merged.read([name]), {module: kind}, rank)
        tensors.update(parts)
        errors.update(error)
    out = folder / "lora"
    out.mkdir()
    save_file(tensors, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(layers),
              "base_model_name_or_path": str(base_dir), "fan_in_fan_out": any(k == "conv1d" for k in layers.values()),
              "lora_dropout": 0.0, "bias": "none", "task_type": None, "inference_mode": True}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    worst = max(errors.values(), default=0.0)
    log.info("lora adapter of rank %d: %d layers, worst relative error %.3g", rank, len(errors), worst)
    return {"rank": rank, "folder": "lora", "layers": errors, "worst_relative_error": worst}


def merge_states(
    owners: Iterable[OwnerState], method: MergeMethod, context: MergeContext | None = None, progress: Any = None
) -> MergeOutcome:
    """Merge owners given as parameter dicts (and statistics where the method needs them); no heads, no files."""
    aggregator = Aggregator(method, context)
    for owner in owners:
        aggregator.add(OwnerUpdate(owner.name, dict(owner.params), set(), (), "", owner.statistics))
        if progress is not None:
            progress.update(1)
    return aggregator.combined(method)


def owner_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, made unique with their position where two owners' folders share a name."""
    names = [path.name or str(path) for path in paths]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


@dataclass
class FolderOwner:
    """An owner's model folder, opened: its config, what its checkpoint holds (read lazily) and its statistics."""

    name: str
    path: Path
    config: Any
    files: CheckpointFiles | AdapterFiles
    head: set[str]
    statistics: GramStatistics | None
    task: str = ""

    @property
    def label_set(self) -> tuple:
        return label_set(self.config)

    def float_names(self) -> list[str]:
        return [name for name in self.files if self.files.is_float(name)]

    def body_shapes(self) -> dict[str, tuple]:
        return {name: self.files.shape(name) for name in self.float_names() if name not in self.head}


def open_owner(name: str, path: Path, needs_statistics: bool, task: str | None = None,
               base: Path | None = None) -> FolderOwner:
    """An owner folder checked from headers alone: a loadable model of a supported task (its architecture's, or
    ``task``) whose checkpoint lacks no weight, or a LoRA adapter folder (its effective weights over its base, or
    ``base``)."""
    from transformers import AutoConfig

    from .tasks import task_of

    quiet_transformers()
    if not (path / "config.json").is_file() and not is_adapter(path):
        raise CompatibilityError(f"owner {name!r}: {path} is not a model folder (no config.json) nor a LoRA adapter "
                                 "folder (no adapter_config.json)")
    try:
        files = checkpoint_files(path, base)
        config = AutoConfig.from_pretrained(str(model_folder(path, base)))
        kind = task_of(config, task or getattr(getattr(files, "adapter", None), "task", None))
        skeleton = model_skeleton(config, kind.name)
    except GramfuseError as error:
        raise type(error)(f"owner {name!r}: {error}") from error
    except (OSError, ValueError, KeyError) as error:
        raise CompatibilityError(f"owner {name!r}: {path}: cannot read the model: {error}") from error
    missing = missing_from(skeleton, set(files))
    if missing:
        raise CompatibilityError(f"owner {name!r}: {path}: {missing_weights_message(missing, kind.name)}")
    stats = open_statistics(path / STATS_FILENAME, name) if needs_statistics else None
    if stats is not None:
        for module, info in stats.modules.items():
            if info.weight not in files:
                raise StatisticsError(f"owner {name!r}: layer {module!r} in the statistics is not in the model")
        check_layers(f"owner {name!r}: {path / STATS_FILENAME}", stats,
                     {n: files.shape(n) for n in {info.weight for info in stats.modules.values()}},
                     {module: kind for module, _, kind in linear_modules(skeleton)})
    return FolderOwner(name, path, config, files, head_names(skeleton), stats, kind.name)


def check_owners(owners: Sequence[FolderOwner]) -> None:
    """Every owner against the first: model type, body shapes, shared-Gram layout."""
    reference = owners[0]
    for owner in owners[1:]:
        if owner.task != reference.task:
            raise CompatibilityError(f"owner {owner.name!r}: a {owner.task} model, but owner {reference.name!r}'s is "
                                     f"a {reference.task} model")
        if owner.config.model_type != reference.config.model_type:
            raise CompatibilityError(
                f"owner {owner.name!r}: model type {owner.config.model_type!r} differs from owner {reference.name!r}'s "
                f"{reference.config.model_type!r}"
            )
        check_same_shapes(owner.name, owner.body_shapes(), reference.name, reference.body_shapes())
        if owner.statistics is not None and reference.statistics is not None:
            check_layout(owner.name, owner.statistics.modules, reference.name, reference.statistics.modules)


def check_layout(owner: str, modules: Mapping, reference_owner: str, reference: Mapping) -> None:
    for module, info in modules.items():
        other = reference.get(module)
        if other is not None and other.gram != info.gram:
            raise CompatibilityError(
                f"owner {owner!r}: layer {module!r} shares the Gram of {info.gram!r}, but for owner "
                f"{reference_owner!r} that of {other.gram!r}"
            )


def check_distinct_folders(owners: Sequence[FolderOwner]) -> None:
    """One folder given twice (again, with a trailing slash, through a link) would count its owner twice."""
    seen: dict[Path, str] = {}
    for owner in owners:
        resolved = owner.path.resolve()
        if resolved in seen:
            raise CompatibilityError(f"owner {owner.name!r}: {owner.path} is owner {seen[resolved]!r}'s folder again; "
                                     "give each owner once")
        seen[resolved] = owner.name


def check_not_a_copy(owner: FolderOwner, fingerprint: str, seen: dict[tuple, str]) -> None:
    """A copy of another owner's folder (the same weights and statistics of the same counts) would count its data
    twice: an error. The same weights with other statistics are two sites of one model, and merge; the same weights
    without statistics cannot be told from a copy, and merge with a warning."""
    stats = owner.statistics
    counts = None if stats is None else (stats.example_count, tuple(sorted(stats.token_counts.items())),
                                         contribution_settings(stats.settings, stats.privacy))
    key = (fingerprint, counts)
    if key in seen and counts is not None:
        raise CompatibilityError(f"owner {owner.name!r}: the same weights and statistics as owner {seen[key]!r} "
                                 "(a copy of its folder?); give each owner once")
    if key in seen:
        log.warning("owners %r and %r hold the very same weights (a copy?): merged as two owners", seen[key],
                    owner.name)
    seen.setdefault(key, owner.name)


def check_same_tokenizer(owners: Sequence[FolderOwner], base: Path | None) -> None:
    """Owners fine-tuned with different tokenizers do not share an input space (the merge would ship the first's)."""
    reference, reference_vocab = None, None
    for owner in owners:
        tokenizer = tokenizer_or_none(owner.path, base)
        if tokenizer is None:
            continue
        vocab = tokenizer.get_vocab()
        if reference is None:
            reference, reference_vocab = owner.name, vocab
        elif vocab != reference_vocab:
            differing = len(set(vocab.items()) ^ set(reference_vocab.items()))
            raise CompatibilityError(f"owner {owner.name!r}: its tokenizer ({len(vocab)} tokens) differs from owner "
                                     f"{reference!r}'s ({len(reference_vocab)} tokens; {differing} token ids differ): "
                                     "owners must share the pretrained model's tokenizer")


def check_statistics_settings(owners: Sequence[FolderOwner]) -> None:
    """Statistics made with different --max-length see different spans of text: legal, but worth a word."""
    lengths = {owner.name: owner.statistics.settings.get("max_length") for owner in owners
               if owner.statistics is not None and owner.statistics.settings.get("max_length") is not None}
    if len(set(lengths.values())) > 1:
        first, *rest = lengths.items()
        other = next(item for item in rest if item[1] != first[1])
        log.warning("owners %r and %r made their statistics with --max-length %s and %s: long examples weigh "
                    "differently in their Grams", first[0], other[0], first[1], other[1])


def verify_weights(owner: FolderOwner) -> str:
    """Read every weight once, one tensor at a time: finite, and those the statistics were computed from. Returns
    the weights' fingerprint."""

    def finite(name: str, value: torch.Tensor) -> None:
        if not all_finite(value):
            raise MergeError(f"owner {owner.name!r}: layer {name!r}: weights hold NaN or Inf")

    fingerprint = owner.files.fingerprint(each=finite)
    stats = owner.statistics
    if stats is not None and stats.fingerprint != fingerprint:
        raise StatisticsError(
            f"owner {owner.name!r}: {owner.path / STATS_FILENAME} was made from other weights than those in "
            f"{owner.path} (fingerprints differ); run `gramfuse stats` on this model again"
        )
    return fingerprint


def load_base(base_dir: str | Path | None, task: str | None = None) -> dict | None:
    if base_dir is None:
        return None
    model, missing = load_model(base_dir, task, allow_missing=True)
    # Weights the base checkpoint lacks were initialised at random by transformers: they are no base at all.
    return {name: value for name, value in float_state(model).items() if name not in set(missing)}


def merge_context(method: MergeMethod, owners: Sequence[FolderOwner], base: Mapping | None,
                  device: str = "cpu") -> MergeContext:
    """The owners' shared context; the hooked layers are every owner's (adapters hook only the layers they adapt)."""
    stats = [owner.statistics for owner in owners if owner.statistics is not None]
    gram_dtype = "float32" if any(s.gram_dtype == "float32" for s in stats) else "float64"
    modules = {module: info for s in reversed(stats) for module, info in s.modules.items()}
    return MergeContext(base=base, modules=modules, gram_dtype=gram_dtype, diagonal=needs_diagonal([method]),
                        device=str(resolve_device(device)))


def streamed_sums(owners: Sequence[FolderOwner], head_owners: set[str], context: MergeContext):
    """``sums_of`` for :func:`fusion.finish.finish`: a group's sums over the owners, reading only its tensors."""

    def sums_of(method: MergeMethod, group: Group) -> Sums:
        sums = Sums()
        for owner in owners:
            if group.head and owner.name not in head_owners:
                continue
            sums.add(group_contribution(method, owner, group, context))
        return sums

    return sums_of


def group_contribution(method: MergeMethod, owner: FolderOwner, group: Group, context: MergeContext) -> dict:
    """An owner folder's contribution to one group, reading only the group's tensors."""
    return method.contribute(OwnerState(owner.name, Restricted(owner.files, group.tensors), owner.statistics), context)


def merge_folders(
    model_dirs: Sequence[str | Path],
    out_dir: str | Path,
    method: MergeMethod,
    *,
    base_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Any = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    device: str = "cpu",
    task: str | None = None,
    lora_rank: int | None = None,
    save_sums: str | Path | None = None,
    data: Sequence[str | Path] = (),
    data_settings: Any = None,
) -> dict[str, Any]:
    """Merge owners' model folders (each with its statistics file) into ``out_dir``; returns the report.

    The merged model holds the label set most owners share (:func:`fusion.finish.plan_outputs`); every other owner
    gets a folder ``out_dir/<owner>`` with the merged body and its own head. ``progress`` is a tqdm-like object whose
    total is set to the number of groups. ``device`` (``cpu``, ``cuda``, ``auto``) runs the Gram products and solves.
    ``task`` overrides the task the owners' ``config.architectures`` give (:mod:`fusion.tasks`). Owners may be LoRA
    adapter folders (:mod:`fusion.adapters`; ``base_dir`` overrides their base). ``lora_rank`` also writes
    ``out_dir/lora``, a LoRA adapter of that rank of the merge against the base. ``save_sums`` also writes the
    aggregation's sums with a ledger of the owners (:mod:`fusion.sumsfile`), to add or remove owners later with
    :func:`merge_from_sums`. A method that needs data (RegMean++) takes one data file per owner in ``data``, read with
    ``data_settings`` (:class:`fusion.workflows.DataSettings`), instead of statistics files.
    """
    started = time.perf_counter()
    paths = [Path(p) for p in model_dirs]
    if not paths:
        raise MergeError("no model folders given")
    check_data_files(method, paths, data, save_sums)
    needs_statistics = (method.needs_statistics or method.needs_fisher) and not method.needs_data
    device = str(resolve_device(device))  # before any owner is read: a missing device is the user's first error
    base_path = Path(base_dir) if base_dir is not None else None
    inputs = [*paths, *([base_path] if base_path else [])]
    check_apart(out_dir, inputs)  # before any owner is read: `-o` naming an input is the user's first error
    if save_sums is not None:
        check_apart(save_sums, [*inputs, out_dir])
    owners = [open_owner(name, path, needs_statistics, task, base_path)
              for name, path in zip(owner_names(paths), paths)]
    check_distinct_folders(owners)
    check_owners(owners)
    check_same_tokenizer(owners, base_path)
    check_statistics_settings(owners)
    base_dir = base_path or common_base(owners, needed=method.needs_base or bool(lora_rank))
    seen: dict[tuple, str] = {}
    ledger, fingerprints = [], {}
    for owner in owners:
        if method.needs_fisher and not owner.statistics.fisher:
            raise MergeError(f"owner {owner.name!r}: method 'fisher' needs Fisher statistics "
                             "(`gramfuse stats --fisher`)")
        fingerprint = verify_weights(owner)
        check_not_a_copy(owner, fingerprint, seen)
        entry = LedgerEntry.of(owner.name, owner.path, fingerprint, owner.statistics)
        warn_if_redrawn(entry, ledger)
        ledger.append(entry)
        fingerprints[owner.name] = fingerprint
        log.info("owner %s: checked, %s examples", owner.name,
                 owner.statistics.example_count if owner.statistics else "?")
    plusplus = None
    if method.needs_data:
        plusplus = plusplus_owners(owners, data, method, fingerprints, data_settings, base_path, device, progress)
    by_name = {owner.name: owner for owner in owners}
    order = [owner.name for owner in owners]
    own_heads = {o.name: Restricted(o.files, sorted(o.head & set(o.float_names()))) for o in owners if o.head}
    outputs = plan_outputs(order, {o.name: o.label_set for o in owners}, {o.name: o.config for o in owners}, own_heads)
    reference = by_name[outputs[0].owners[0]]
    context = merge_context(method, owners, load_base(base_dir, owners[0].task) if method.needs_base else None, device)
    names = reference.float_names()
    groups = plan_groups(names, reference.head, context.modules)
    if progress is not None:
        progress.reset(total=len(groups))
    shared = len({o.label_set for o in owners}) == 1
    if save_sums is not None and not shared:
        raise SumsFileError("--save-sums needs owners that share a label set (their heads are summed); these "
                            "differ, so each keeps its own head")
    common = {"owners": [owner_summary(o) for o in owners], "shared_label_set": shared}
    dtypes = {name: reference.files.dtype(name) for name in names}
    tokenizer = tokenizer_or_none(reference.path, base_path)
    copied = reference.files.read(n for n in reference.files if not reference.files.is_float(n))
    with atomic_folder(out_dir, overwrite, inputs) as staging, \
            optional_folder(save_sums, overwrite, inputs) as sums_staging:
        sums_of = streamed_sums(owners, set(outputs[0].owners), context)
        writer = SumsWriter(sums_staging, max_shard_bytes) if sums_staging is not None else None
        reports = finish(
            {method.label(): staging}, [method], groups, writer.recording(sums_of) if writer else sums_of, context,
            outputs, dtypes, report=common, tokenizer=tokenizer, copied=copied, max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
        report = reports[method.label()]
        if writer is not None:
            meta = sums_meta(method, ledger, names, reference, dtypes, context, base_dir)
            meta.history.append({"merged": [entry.name for entry in ledger]})
            writer.close(meta, copied, reference.config, tokenizer)
            report["sums"] = {"saved": str(save_sums), "owners": len(ledger)}
        if lora_rank:
            report["lora"] = write_lora(staging, base_dir, context.modules, lora_rank)
        if plusplus is not None:
            report["regmean++"] = plusplus
        report["seconds"] = round(time.perf_counter() - started, 3)
        write_report(staging, report)
    return report


def check_data_files(method: MergeMethod, paths: Sequence[Path], data: Sequence[str | Path],
                     save_sums: str | Path | None) -> None:
    """A method that needs data gets one existing file per owner, and no sums (its statistics depend on every owner,
    so no owner can join or leave them); any other method gets none."""
    if not method.needs_data:
        if data:
            raise MergeError(f"method {method.name!r} takes its statistics from the owners' statistics files; data "
                             "files are for a method that needs the data itself (regmean++)")
        return
    if len(data) != len(paths):
        raise MergeError(f"method {method.name!r} needs one data file per model folder, in the same order: "
                         f"{len(paths)} folders, {len(data)} data files")
    for path, data_file in zip(paths, data):
        if not Path(data_file).is_file():
            raise MergeError(f"owner {path.name!r}: data file {data_file} does not exist")
    if save_sums is not None:
        raise SumsFileError(f"method {method.name!r} has no sums to save: each owner's Grams are taken through the "
                            "merge of all owners, so no owner can be added or removed later; merge again instead")


def plusplus_owners(owners: Sequence[FolderOwner], data: Sequence[str | Path], method: MergeMethod,
                    fingerprints: Mapping[str, str], settings: Any, base: Path | None, device: str,
                    progress: Any) -> dict[str, Any]:
    """Give each owner its RegMean++ statistics (:mod:`fusion.plusplus`), its data run through the merge as it is
    built, on one working model; returns the pass's report."""
    from .plusplus import PassOwner, plusplus_statistics
    from .workflows import DataSettings, config_batches

    started = time.perf_counter()
    settings = replace(settings or DataSettings(), task=(settings and settings.task) or owners[0].task)
    model, _ = load_model(owners[0].path, owners[0].task, base=base)
    model = model.to(device)
    passing = []
    for owner, data_file in zip(owners, data):
        # read as the owner's own model reads it (where label sets differ, its labels are its config's)
        batches = list(config_batches(owner.config, folder_tokenizer(owner.path, base), Path(data_file), settings,
                                      False))
        passing.append(PassOwner(owner.name, owner.files, batches, fingerprints[owner.name]))
    shared = len({owner.label_set for owner in owners}) == 1
    diagonal = needs_diagonal([method])

    def unit_context(modules: Mapping) -> MergeContext:
        return MergeContext(modules=dict(modules), diagonal=diagonal, device=device)

    statistics = plusplus_statistics(model, passing, method, unit_context, head=set() if shared else owners[0].head,
                                     settings=asdict(settings), progress=progress)
    for owner in owners:
        owner.statistics = statistics[owner.name]
    del model
    return {"data": [str(p) for p in data], "examples": {o.name: o.statistics.example_count for o in owners},
            "seconds": round(time.perf_counter() - started, 3)}


@contextlib.contextmanager
def optional_folder(folder: str | Path | None, overwrite: bool, inputs: Sequence[Path]):
    """:func:`atomic_folder` where a folder is asked for; None otherwise."""
    if folder is None:
        yield None
        return
    with atomic_folder(folder, overwrite, inputs) as staging:
        yield staging


def base_fingerprint(base_dir: str | Path | None) -> str:
    return CheckpointFiles(base_dir).fingerprint() if base_dir is not None else ""


def sums_meta(method: MergeMethod, ledger: list[LedgerEntry], names: list[str], reference: FolderOwner,
              dtypes: Mapping[str, torch.dtype], context: MergeContext, base_dir: str | Path | None) -> SumsMeta:
    return SumsMeta(
        method=method.name, options=method.options(), owners=list(ledger), names=list(names),
        head=sorted(reference.head & set(names)), dtypes={n: str(d).removeprefix("torch.") for n, d in dtypes.items()},
        shapes={n: list(shape) for n, shape in reference.body_shapes().items()},
        modules={m: asdict(info) for m, info in context.modules.items()}, model_type=reference.config.model_type,
        task=reference.task, label_set=[list(item) for item in reference.label_set], gram_dtype=context.gram_dtype,
        diagonal=context.diagonal, base_fingerprint=base_fingerprint(base_dir) if method.contributes_relative_to_base else "",
    )


def merge_from_sums(
    sums_dir: str | Path,
    out_dir: str | Path,
    method: MergeMethod,
    *,
    add: Sequence[str | Path] = (),
    remove: Sequence[str | Path] = (),
    save_sums: str | Path | None = None,
    base_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Any = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    device: str = "cpu",
) -> dict[str, Any]:
    """The merge of the owners inside ``sums_dir`` (:mod:`fusion.sumsfile`), with the owners of the folders ``add``
    added and those of ``remove`` removed, each contribution recomputed from its folder and statistics file; it equals
    merging the resulting owner set from scratch. ``save_sums`` writes the new sums and ledger. Returns the report."""
    started = time.perf_counter()
    sums = SumsFolder(sums_dir)
    meta = sums.meta
    check_method_fits(meta, method, sums.folder)
    if needs_diagonal([method]) and not meta.diagonal:
        raise SumsFileError(f"{sums.folder}: holds no diag(G) W^T sums (formed with alpha 1); merge the owners again "
                            f"with the alpha you need, then its sums serve every alpha")
    added_paths, removed_paths = [Path(p) for p in add], [Path(p) for p in remove]
    base_path = Path(base_dir) if base_dir is not None else None
    inputs = [sums.folder, *added_paths, *removed_paths, *([base_path] if base_path else [])]
    check_apart(out_dir, inputs)
    if save_sums is not None:
        check_apart(save_sums, [*inputs, out_dir])
    needs_statistics = method.needs_statistics or method.needs_fisher
    taken = [entry.name for entry in meta.owners]
    added = [open_owner(name, path, needs_statistics, meta.task, base_path)
             for name, path in zip(fresh_names(added_paths, taken), added_paths)]
    removed = [open_owner(name, path, needs_statistics, meta.task, base_path)
               for name, path in zip(owner_names(removed_paths), removed_paths)]
    check_distinct_folders([*added, *removed])
    for owner in [*added, *removed]:
        check_fits_sums(owner, meta)
    leaving = removed_entries(sums, removed)
    remaining = ledger_after(sums, added, leaving)
    context = sums_context(meta, method, added, device)
    if method.needs_base:
        context.base = checked_base(meta, base_path, method)
    groups = plan_groups(meta.names, set(meta.head), context.modules)
    if progress is not None:
        progress.reset(total=len(groups))
    config = sums_config(sums.folder)
    order = [entry.name for entry in remaining]
    outputs = plan_outputs(order, {name: tuple(map(tuple, meta.label_set)) for name in order},
                           {name: config for name in order}, {})
    changed = {"added": [o.name for o in added], "removed": [entry.name for entry in leaving]}
    common = {"owners": [{"name": e.name, "path": e.path} for e in remaining], "shared_label_set": True,
              "sums": {"from": str(sums.folder), **changed}}
    dtypes = {name: getattr(torch, dtype) for name, dtype in meta.dtypes.items()}
    tokenizer, copied = tokenizer_or_none(sums.folder), sums.copied()
    with atomic_folder(out_dir, overwrite, inputs) as staging, \
            optional_folder(save_sums, overwrite, inputs) as sums_staging:
        sums_of = updated_sums(sums, added, removed, context)
        writer = SumsWriter(sums_staging, max_shard_bytes) if sums_staging is not None else None
        reports = finish({method.label(): staging}, [method], groups, writer.recording(sums_of) if writer else sums_of,
                         context, outputs, dtypes, report=common, tokenizer=tokenizer, copied=copied,
                         max_shard_bytes=max_shard_bytes, progress=progress)
        report = reports[method.label()]
        if writer is not None:
            new_meta = SumsMeta(**{**asdict(meta), "owners": remaining, "modules": {
                m: asdict(info) for m, info in context.modules.items()}, "gram_dtype": context.gram_dtype,
                "history": [*meta.history, changed]})
            writer.close(new_meta, copied, config, tokenizer)
            report["sums"]["saved"] = str(save_sums)
        report["seconds"] = round(time.perf_counter() - started, 3)
        write_report(staging, report)
    log.info("merged %d owners from %s (%d added, %d removed)", len(remaining), sums.folder, len(added), len(removed))
    return report


def fresh_names(paths: Sequence[Path], taken: Sequence[str]) -> list[str]:
    """Owner names for ``paths`` that no owner inside the sums has already."""
    names = []
    for name in owner_names(paths):
        unique, index = name, 1
        while unique in taken or unique in names:
            unique, index = f"{name}-{index}", index + 1
        names.append(unique)
    return names


def check_fits_sums(owner: FolderOwner, meta: SumsMeta) -> None:
    """An owner added to or removed from sums must be a model of their kind: task, model type, body shapes, label
    set, and the same Gram layout."""
    if owner.task != meta.task:
        raise CompatibilityError(f"owner {owner.name!r}: a {owner.task} model, but the sums are of {meta.task} models")
    problem = meta.misfit(owner.config.model_type, owner.label_set, owner.body_shapes())
    if problem:
        raise CompatibilityError(f"owner {owner.name!r}: {problem}")
    if owner.statistics is not None:
        check_layout(owner.name, owner.statistics.modules, "the sums", meta.module_infos())


def owner_summary(owner: FolderOwner) -> dict[str, Any]:
    """An owner in the report: its name and folder, and the noise of its statistics where they are DP."""
    privacy = owner.statistics.privacy if owner.statistics is not None else None
    return {"name": owner.name, "path": str(owner.path), **({"privacy": privacy} if privacy else {})}


def owner_entry(owner: FolderOwner) -> LedgerEntry:
    return LedgerEntry.of(owner.name, owner.path, verify_weights(owner), owner.statistics)


def removed_entries(sums: SumsFolder, removed: Sequence[FolderOwner]) -> list[LedgerEntry]:
    """The ledger entries of the owners to remove; one that is not inside is an error naming it."""
    entries = {owner.name: owner_entry(owner) for owner in removed}
    inside = sums.owners_matching(entries.values())
    for owner in removed:
        if owner.name not in inside:
            raise SumsFileError(f"owner {owner.name!r} ({owner.path}) is not inside {sums.folder}: no owner there has "
                                "its weights and statistics (its fingerprint or counts differ), so it cannot be "
                                "removed")
    return [inside[owner.name] for owner in removed]


def ledger_after(sums: SumsFolder, added: Sequence[FolderOwner], leaving: Sequence[LedgerEntry]) -> list[LedgerEntry]:
    """The ledger once ``leaving`` are out and ``added`` in; an added owner already inside is an error naming it."""
    entries = [owner_entry(owner) for owner in added]
    already = sums.owners_matching(entries)
    for entry in entries:
        if entry.name in already:
            raise SumsFileError(f"owner {entry.name!r} ({entry.path}) is already inside {sums.folder} as owner "
                                f"{already[entry.name].name!r} (same weights and statistics): adding it again would "
                                "count its data twice")
        warn_if_redrawn(entry, sums.meta.owners)
    identities = [entry.identity() for entry in entries]
    if len(set(identities)) < len(identities):
        raise SumsFileError("the same owner is given twice in --add (same weights and statistics)")
    out = [entry.identity() for entry in leaving]
    if len(set(out)) < len(out):
        raise SumsFileError("the same owner is given twice in --remove")
    remaining = [entry for entry in sums.meta.owners if entry.identity() not in out] + entries
    if not remaining:
        raise SumsFileError(f"removing every owner of {sums.folder} leaves nothing to merge")
    return remaining


def sums_context(meta: SumsMeta, method: MergeMethod, added: Sequence[FolderOwner], device: str) -> MergeContext:
    """The context the sums were formed in, with the layers added owners hook (adapters may hook more)."""
    modules = meta.module_infos()
    for owner in added:
        for module, info in (owner.statistics.modules.items() if owner.statistics is not None else ()):
            modules.setdefault(module, info)
    float32 = meta.gram_dtype == "float32" or any(o.statistics is not None and o.statistics.gram_dtype == "float32"
                                                  for o in added)
    return MergeContext(modules=modules, gram_dtype="float32" if float32 else "float64",
                        diagonal=meta.diagonal or needs_diagonal([method]), device=str(resolve_device(device)))


def checked_base(meta: SumsMeta, base_path: Path | None, method: MergeMethod) -> dict:
    """The base ``method`` reads: for task vectors, the one the sums were formed against, given again and the same
    one; for RegMean's LiNeS (absolute sums, the base read at the end only), any base of the model."""
    if base_path is None:
        raise MergeError(f"method {meta.method!r} works relative to the base model: give --base BASE_DIR (the one "
                         "the sums were formed against)")
    if method.contributes_relative_to_base and base_fingerprint(base_path) != meta.base_fingerprint:
        raise SumsFileError(f"{base_path}: not the base the sums were formed against (fingerprints differ)")
    return load_base(base_path, meta.task)


def sums_config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


def updated_sums(sums: SumsFolder, added: Sequence[FolderOwner], removed: Sequence[FolderOwner],
                 context: MergeContext):
    """``sums_of`` for :func:`fusion.finish.finish`: a group's stored sums plus the added owners' contributions and
    minus the removed ones', reading only that group's tensors."""

    def sums_of(method: MergeMethod, group: Group) -> Sums:
        group_sums = sums.group_sums(group, context.device)
        for owner in added:
            group_sums.add(group_contribution(method, owner, group, context))
        for owner in removed:
            group_sums.subtract(group_contribution(method, owner, group, context))
        return group_sums

    return sums_of
