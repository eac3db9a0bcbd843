"""Sums folders: an aggregation's sums, with a ledger of the owners inside, so that owners join and leave exactly.

Every merge method is additive: the merge is a function of sums over owners. A sums folder keeps those sums
(float64, tensor by tensor, as sharded safetensors) next to what the finish needs (the merged model's config and
tokenizer, the parameters' names and dtypes, the layer map, integer buffers) and a ledger: each owner's name,
weights' fingerprint, statistics counts and settings. An owner is later added by adding its contribution, or removed
by subtracting it, recomputed from its folder and statistics file and matched against the ledger. The result is the
merge of the new owner set from scratch, to float64 rounding (:func:`fusion.merge.merge_from_sums`).

Layout of a sums folder: ``gramfuse-sums.json`` (the ledger and metadata), ``model.safetensors`` (or shards and an
index; keys are the methods' sum keys, ``copied/<name>`` for integer buffers), ``config.json`` and the tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import DEFAULT_SHARD_BYTES, ShardWriter
from .errors import GramfuseError
from .finish import Group
from .lazy import CheckpointFiles
from .methods import MergeMethod, Sums, get_method
from .statistics import GramStatistics, ModuleInfo

SUMS_FILE = "gramfuse-sums.json"
FORMAT = "gramfuse-sums/1"
COPIED = "copied/"  # integer buffers (position ids): not summed, written as the reference owner had them


class SumsFileError(GramfuseError):
    """A sums folder that cannot be read, or an owner that cannot be added to or removed from it."""


DRAW = "privacy-draw"


def contribution_settings(settings: dict, privacy: dict | None) -> str:
    """Statistics settings as a ledger keeps them, sorted JSON; a DP file's noise draw is part of its contribution
    (the same request drawn again is another contribution, whose subtraction would leave the old noise behind)."""
    # A hostile site's layout can carry anything as its privacy record: only a mapping names a draw.
    draw = privacy.get("draw") if isinstance(privacy, Mapping) else None
    return json.dumps({**settings, **({DRAW: draw} if draw else {})}, sort_keys=True)


# Under DP the token counts are withheld, so two sites of one model over as many examples cannot be told from one
# site whose statistics were drawn twice: warned, not refused (the site's budget charged the second draw).
REDRAW_WARNING = ("owner %r has the same weights and example count as owner %r, both with DP statistics of another "
                  "draw: two sites of one model merge as two owners, but if this is one site's statistics drawn again "
                  "its data counts twice")
log = logging.getLogger("gramfuse")


def warn_if_redrawn(entry: LedgerEntry, others: Iterable[LedgerEntry]) -> None:
    """Name ``entry`` in a warning where it may be one of ``others`` drawn again (:meth:`LedgerEntry.redraw_of`)."""
    redrawn = next((other for other in others if entry.redraw_of(other)), None)
    if redrawn is not None:
        log.warning(REDRAW_WARNING, entry.name, redrawn.name)


@dataclass(frozen=True)
class LedgerEntry:
    """One owner inside the sums: what identifies its contribution (weights and statistics), not where it lives."""

    name: str
    fingerprint: str  # of its weights (:meth:`fusion.lazy.CheckpointFiles.fingerprint`)
    example_count: int = 0
    token_counts: tuple = ()  # (gram key, tokens) pairs, sorted
    settings: str = ""  # its statistics settings, as sorted JSON
    path: str = ""  # where it was read from, for people; not used to match

    @staticmethod
    def of(name: str, path: Path, fingerprint: str, statistics: GramStatistics | None) -> LedgerEntry:
        if statistics is None:
            return LedgerEntry(name, fingerprint, path=str(path))
        return LedgerEntry(name, fingerprint, statistics.example_count,
                           tuple(sorted((k, int(v)) for k, v in statistics.token_counts.items())),
                           contribution_settings(statistics.settings, statistics.privacy), str(path))

    def identity(self) -> tuple:
        """Equal for the same contribution: the same weights with the same statistics."""
        return (self.fingerprint, self.example_count, self.token_counts, self.settings)

    def redraw_of(self, other: LedgerEntry) -> bool:
        """Whether this may be ``other``'s data drawn again: both differentially private, the same weights and
        example count, another contribution (another noise draw, maybe under another request or mechanism version;
        or another site of the same model over as many examples: under DP the token counts that would tell them
        apart are withheld). Subtracting one for the other would leave the other's noise."""
        return (self.private and other.private and self.fingerprint == other.fingerprint
                and self.example_count == other.example_count and self.identity() != other.identity())

    @property
    def private(self) -> bool:
        """Whether its statistics were differentially private (a noise draw is part of its settings)."""
        return f'"{DRAW}"' in self.settings

    def to_json(self) -> dict:
        return {**asdict(self), "token_counts": dict(self.token_counts)}

    @staticmethod
    def from_json(data: Mapping) -> LedgerEntry:
        return LedgerEntry(str(data["name"]), str(data["fingerprint"]), int(data.get("example_count", 0)),
                           tuple(sorted((str(k), int(v)) for k, v in dict(data.get("token_counts", {})).items())),
                           str(data.get("settings", "")), str(data.get("path", "")))


@dataclass
class SumsMeta:
    """Everything in ``gramfuse-sums.json``."""

    method: str  # the method's name
    options: dict[str, Any]  # its options (those that shape the sums decide whether another method may use them)
    owners: list[LedgerEntry]
    names: list[str]  # the merged parameters, in order
    head: list[str]  # those that are the head
    dtypes: dict[str, str]  # parameter -> the dtype it is saved in
    shapes: dict[str, list[int]]  # body parameter -> shape: what an owner added or removed must match
    modules: dict[str, dict]  # the layer map (:class:`fusion.statistics.ModuleInfo` fields)
    model_type: str
    task: str
    label_set: list
    gram_dtype: str = "float64"
    diagonal: bool = False  # whether diag(G) W^T sums are inside (RegMean with some alpha < 1 needs them)
    base_fingerprint: str = ""  # methods relative to a base: the base the sums were formed against
    history: list[dict] = field(default_factory=list)  # what each step did: merged, added, removed

    def merge_method(self) -> MergeMethod:
        return get_method(self.method, **self.options)

    def module_infos(self) -> dict[str, ModuleInfo]:
        return {name: ModuleInfo(**info) for name, info in self.modules.items()}

    def misfit(self, model_type: str, label_set: Sequence, body_shapes: Mapping[str, Sequence[int]]) -> str:
        """Why a model of this type, label set and body (names and shapes, heads left out) cannot join or leave
        these sums; '' where it can. One rule for ``merge --sums`` and the server's state-dir."""
        if model_type != self.model_type:
            return f"a {model_type} model, but the sums are of {self.model_type} models"
        if [list(item) for item in label_set] != [list(item) for item in self.label_set]:
            return (f"label set {[label for _, label in label_set]} differs from the sums' "
                    f"{[label for _, label in self.label_set]} (their heads are summed)")
        shapes = {name: list(shape) for name, shape in body_shapes.items()}
        if shapes == self.shapes:
            return ""
        missing, extra = sorted(set(self.shapes) - set(shapes)), sorted(set(shapes) - set(self.shapes))
        if missing or extra:
            detail = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}"
            return f"its weights' names differ from the sums' ({detail})"
        name = next(name for name in shapes if shapes[name] != self.shapes[name])
        return f"layer {name!r} has shape {tuple(shapes[name])}, the sums' {tuple(self.shapes[name])}"

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self), "owners": [entry.to_json() for entry in self.owners]}

    @staticmethod
    def from_json(data: Mapping, where: Path) -> SumsMeta:
        if data.get("format") != FORMAT:
            raise SumsFileError(f"{where}: not a gramfuse sums folder of format {FORMAT!r} "
                                f"(format {data.get('format')!r})")
        try:
            fields = {key: data[key] for key in SumsMeta.__dataclass_fields__ if key in data}
            fields["owners"] = [LedgerEntry.from_json(entry) for entry in data["owners"]]
            return SumsMeta(**fields)
        except (KeyError, TypeError, ValueError) as error:
            raise SumsFileError(f"{where}: {SUMS_FILE} is malformed ({type(error).__name__}: {error})") from error


def check_method_fits(meta: SumsMeta, method: MergeMethod, where: Path) -> None:
    """Only a method whose contributions are those the sums hold (RegMean at another alpha is; averaging is not)."""
    stored = meta.merge_method()
    if stored.sums_key() != method.sums_key():
        raise SumsFileError(f"{where}: holds the sums of {stored.label()!r}; method {method.label()!r} needs other "
                            "sums (merge the owners again with it, or use a method that shares them)")


class SumsWriter:
    """The sums of a merge written group by group as they are formed: wrap the merge's ``sums_of`` with
    :meth:`recording`, then :meth:`close` with the metadata. Owner-wide scalars (counts) are written once."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.folder = Path(folder)
        self.shards = ShardWriter(self.folder, max_shard_bytes)
        self.written: set[str] = set()

    def recording(self, sums_of: Callable[[MergeMethod, Group], Sums]) -> Callable[[MergeMethod, Group], Sums]:
        def recorded(method: MergeMethod, group: Group) -> Sums:
            sums = sums_of(method, group)
            self.add(sums)
            return sums

        return recorded

    def add(self, sums: Mapping[str, torch.Tensor]) -> None:
        fresh = {key: value.detach().to(torch.float64).contiguous() for key, value in sums.items()
                 if key not in self.written}
        self.shards.add(fresh)
        self.written.update(fresh)

    def close(self, meta: SumsMeta, copied: Mapping[str, torch.Tensor], config: Any, tokenizer: Any) -> None:
        self.shards.add({COPIED + name: value.contiguous() for name, value in copied.items()})
        self.shards.close()
        config.save_pretrained(str(self.folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.folder))
        (self.folder / SUMS_FILE).write_text(json.dumps(meta.to_json(), indent=2))


class SumsFolder:
    """A sums folder, opened: its metadata, and its tensors read lazily, a group's at a time."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / SUMS_FILE
        if not meta_path.is_file():
            raise SumsFileError(f"{self.folder}: not a sums folder (no {SUMS_FILE}; write one with "
                                "`gramfuse merge ... --save-sums`)")
        try:
            data = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise SumsFileError(f"{meta_path}: not valid JSON ({error})") from error
        self.meta = SumsMeta.from_json(data, meta_path)
        self.files = CheckpointFiles(self.folder)
        self.scalars = [key for key in self.files if "/" not in key]

    def group_sums(self, group: Group, device: str | torch.device = "cpu") -> Sums:
        """The stored sums ``group`` needs (as :func:`fusion.finish.restrict` picks them), read from disk onto
        ``device`` (where the contributions added to them are formed)."""
        keys = group.keys
        wanted = [key for key in self.files
                  if not key.startswith(COPIED) and ("/" not in key or key.split("/", 1)[1] in keys)]
        return Sums({key: value.to(device=device, dtype=torch.float64) for key, value in self.files.read(wanted).items()})

    def copied(self) -> dict[str, torch.Tensor]:
        names = [key for key in self.files if key.startswith(COPIED)]
        return {key[len(COPIED):]: value for key, value in self.files.read(names).items()}

    def owners_matching(self, entries: Iterable[LedgerEntry]) -> dict[str, LedgerEntry]:
        """Given owner name -> the ledger entry inside with the same contribution (absent where none)."""
        inside = {entry.identity(): entry for entry in self.meta.owners}
        return {entry.name: inside[entry.identity()] for entry in entries if entry.identity() in inside}
