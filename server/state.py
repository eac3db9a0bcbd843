"""The plaintext server's sums between runs (run config ``state-dir``), so that owners join and leave across runs.

Each run that merges writes a new version, ``state-dir/sums-000N`` (a sums folder, :mod:`fusion.sumsfile`: the
float64 sums with the ledger of the owners inside), and only then names it in ``state-dir/CURRENT``; a run that
fails leaves the previous version current and nothing half-written. A later run asks only the sites that are not
inside yet (they are added) and those whose node config says ``leave=true`` (they are subtracted); sites already
inside are not asked for anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from federation.payload import dtype_from
from fusion.aggregate import Aggregator
from fusion.errors import GramfuseError
from fusion.finish import Group, restrict
from fusion.methods import MergeContext, MergeMethod, Sums
from fusion.methods.regmean import needs_diagonal
from fusion.sumsfile import (LedgerEntry, SumsFileError, SumsFolder, SumsMeta, check_method_fits,
                             contribution_settings, warn_if_redrawn)

CURRENT = "CURRENT"
VERSION = re.compile(r"^sums-(\d{4,})$")


class ServerState:
    """The versions of the server's sums in one folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def current(self) -> SumsFolder | None:
        pointer = self.folder / CURRENT
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        if not VERSION.match(name):
            raise SumsFileError(f"{pointer}: names {name!r}, not a version of the sums (sums-NNNN)")
        return SumsFolder(self.folder / name)

    def next_version(self) -> Path:
        numbers = [int(m.group(1)) for p in self.folder.glob("sums-*") if (m := VERSION.match(p.name))]
        return self.folder / f"sums-{max(numbers, default=0) + 1:04d}"

    def commit(self, version: Path) -> None:
        """Name ``version`` current, atomically (a reader sees the old name or the new, never a torn file)."""
        temporary = self.folder / f".{CURRENT}.partial"
        temporary.write_text(version.name + "\n", encoding="utf-8")
        os.replace(temporary, self.folder / CURRENT)


def entry_from_layout(name: str, layout: dict, where: str) -> LedgerEntry:
    """A site's ledger entry from its layout's statistics metadata: what identifies its contribution."""
    stats = layout["statistics"]
    return LedgerEntry(name, str(stats["fingerprint"]), int(stats["example_count"]),
                       tuple(sorted((str(key), int(info["tokens"])) for key, info in stats["grams"].items())),
                       contribution_settings(stats.get("settings", {}), stats.get("privacy")), where)


class StateKeeper:
    """What a run with ``state-dir`` does besides merging: which sites to ask (those joining and those leaving),
    each group's sums (the stored ones, plus the joining sites', minus the leaving ones'), and the new version."""

    def __init__(self, folder: str | Path, methods: Sequence[MergeMethod]) -> None:
        if len({method.sums_key() for method in methods}) > 1:
            raise GramfuseError("state-dir keeps one set of sums: give methods that share them (RegMean at several "
                                f"alphas does), not {', '.join(m.label() for m in methods)}")
        if not any(method.needs_statistics or method.needs_fisher for method in methods):
            raise GramfuseError("state-dir knows owners by their statistics: use a method that needs them "
                                "(regmean, fisher)")
        self.method = methods[0]
        self.state = ServerState(folder)
        self.state.folder.mkdir(parents=True, exist_ok=True)
        self.stored = self.state.current()
        if self.stored is not None:
            check_method_fits(self.stored.meta, self.method, self.stored.folder)
            if needs_diagonal(list(methods)) and not self.stored.meta.diagonal:
                raise GramfuseError(f"{self.stored.folder}: holds no diag(G) W^T sums (formed with alpha 1), which "
                                    "an alpha below 1 needs; merge with alpha 1, or start a new state-dir")
        # The diagonal sums, once kept, are kept up to date whatever this run's alpha.
        self.diagonal = needs_diagonal(list(methods)) or (self.stored is not None and self.stored.meta.diagonal)
        self.leaving: dict[int, LedgerEntry] = {}  # node -> its entry inside the sums
        self.joining: dict[int, LedgerEntry] = {}

    def sort(self, layouts: Mapping[int, dict], name_of: Callable[[int], str]) -> dict[int, tuple[str, str]]:
        """Sort the sites by what they ask and what the sums hold; returns the sites not to ask: node -> (status,
        reason): those already inside ("inside"), and those that do not fit ("rejected")."""
        inside = {e.identity(): e for e in self.stored.meta.owners} if self.stored is not None else {}
        skipped: dict[int, tuple[str, str]] = {}
        # identity -> the node that adds or subtracts it in this run: a copy would be counted twice, and the sums
        # would leave the ledger (a site inside, not asked, counts nothing and may be there too)
        counted: dict[tuple, int] = {}
        for node, layout in sorted(layouts.items()):
            try:
                entry = entry_from_layout(name_of(node), layout, f"node {node}")
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                skipped[node] = ("rejected", f"state-dir: its layout names no statistics ({error})")
                continue
            known = inside.get(entry.identity())
            if not layout.get("leave"):
                warn_if_redrawn(entry, [*inside.values(), *self.joining.values()])
            if (layout.get("leave") or known is None) and entry.identity() in counted:
                skipped[node] = ("rejected", f"the same weights and statistics as node {counted[entry.identity()]} "
                                             "in this run")
                continue
            if layout.get("leave") or known is None:
                counted[entry.identity()] = node
            if layout.get("leave"):
                if known is None:
                    skipped[node] = ("rejected", "asks to leave (leave=true) but is not inside the server's sums")
                else:
                    self.leaving[node] = known
            elif known is not None:
                skipped[node] = ("inside", f"already inside the server's sums as {known.name!r}: not asked")
            else:
                problem = self.misfit(layout)
                if problem:
                    skipped[node] = ("rejected", problem)
                else:
                    self.joining[node] = entry
        return skipped

    def misfit(self, layout: Mapping) -> str:
        """Why a joining site's model does not fit the stored sums ('' where it does)."""
        if self.stored is None:
            return ""
        head = set(layout.get("head", []))
        shapes = {name: shape for name, shape in layout.get("shapes", {}).items() if name not in head}
        problem = self.stored.meta.misfit(str(layout.get("model_type")), layout.get("label_set", []), shapes)
        return problem and f"against the server's sums: {problem}"

    def remaining(self) -> list[LedgerEntry]:
        leaving = {entry.identity() for entry in self.leaving.values()}
        stored = self.stored.meta.owners if self.stored is not None else []
        return [e for e in stored if e.identity() not in leaving] + list(self.joining.values())

    def sums_of(self, joining: Aggregator, leaving: Aggregator) -> Callable[[MergeMethod, Group], Sums]:
        """A group's sums: the stored ones, plus the joining sites', minus the leaving sites'."""

        def part(aggregator: Aggregator, group: Group) -> Sums:
            source = next(iter(aggregator.head_sums.values()), Sums()) if group.head else aggregator.body
            return restrict(source, group)

        def sums_of(method: MergeMethod, group: Group) -> Sums:
            sums = self.stored.group_sums(group) if self.stored is not None else Sums()
            if joining.owners:
                sums.add(part(joining, group))
            if leaving.owners:
                sums.subtract(part(leaving, group))
            return sums

        return sums_of

    def meta(self, reference: Mapping, context: MergeContext, task: str) -> SumsMeta:
        head = set(reference["head"])
        history = list(self.stored.meta.history) if self.stored is not None else []
        history.append({"added": [e.name for e in self.joining.values()],
                        "removed": [e.name for e in self.leaving.values()]})
        return SumsMeta(
            method=self.method.name, options=self.method.options(), owners=self.remaining(),
            names=list(reference["shapes"]), head=sorted(head),
            dtypes={n: str(dtype_from(d)).removeprefix("torch.") for n, d in reference["dtypes"].items()},
            shapes={n: list(s) for n, s in reference["shapes"].items() if n not in head},
            modules={m: asdict(info) for m, info in context.modules.items()}, model_type=str(reference["model_type"]),
            task=task, label_set=[list(item) for item in reference["label_set"]], gram_dtype=context.gram_dtype,
            diagonal=context.diagonal, history=history)

    def report(self, version: Path | None) -> dict[str, Any]:
        return {"from": self.stored.folder.name if self.stored is not None else None,
                "saved": version.name if version is not None else None,
                "added": [e.name for e in self.joining.values()], "removed": [e.name for e in self.leaving.values()],
                "owners": [e.name for e in self.remaining()]}
