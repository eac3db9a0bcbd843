"""Merge methods, registered by name, all with one interface.

A method never sees all owners at once. Each owner's tensors are turned into a *contribution* (a dict of named
tensors); contributions are added into running :class:`Sums`; the method then *combines* the sums into the merged
parameters. Every method here is exactly additive this way, which is what lets the federation server keep only the
sums (memory flat in the number of owners) and lets secure aggregation hide each owner's contribution.

Adding a method touches one file: a module in this package with a class decorated by :func:`register`. Options are
the dataclass fields of the class.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import MergeError
from ..statistics import GramStatistics, ModuleInfo

Tensors = dict[str, torch.Tensor]
MEAN = "mean/"
WEIGHT = "weight"


@dataclass
class OwnerState:
    """What one owner brings to a merge: its floating-point parameters and, where needed, its statistics."""

    name: str
    params: Mapping[str, torch.Tensor]
    statistics: GramStatistics | None = None

    @property
    def example_count(self) -> int:
        if self.statistics is None:
            raise MergeError(f"owner {self.name!r}: needs a statistics file for its example count")
        return self.statistics.example_count


@dataclass
class MergeContext:
    """What every owner shares: the base model's parameters (for task vectors) and the layout of the hooked layers."""

    base: Mapping[str, torch.Tensor] | None = None
    modules: Mapping[str, ModuleInfo] = field(default_factory=dict)
    gram_dtype: str = "float64"  # the least precise dtype any owner's Gram products were computed in
    # RegMean: also sum diag(G) W^T, which only alpha < 1 reads (see :func:`fusion.methods.regmean.needs_diagonal`)
    diagonal: bool = True
    device: str = "cpu"  # where Gram products and solves run ("cuda" on a GPU); merged parameters come back to the CPU
    # Distributed DP (a secure site's share of the run's noise, fusion.privacy.NoiseShares): the method noises what it
    # releases (only methods with ``noise_units`` can)
    noise: Any = None


@dataclass
class MergeOutcome:
    params: Tensors
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-layer report (condition numbers, …)
    warnings: list[str] = field(default_factory=list)


class Sums(dict):
    """Running float64 sums of contributions; adding is all the aggregation there is."""

    def check(self, contribution: Mapping[str, torch.Tensor]) -> None:
        """Raise if ``contribution`` cannot be added; call before :meth:`add` so a misfit adds nothing at all."""
        for key, value in contribution.items():
            if key in self and self[key].shape != value.shape:
                raise MergeError(f"{key!r}: shape {tuple(value.shape)} does not match the sum's {tuple(self[key].shape)}")

    def add(self, contribution: Mapping[str, torch.Tensor]) -> None:
        self.check(contribution)
        for key, value in contribution.items():
            value = value.detach()
            if key in self:
                self[key].add_(value)  # promoted on the fly: no float64 copy of the contribution
            else:
                self[key] = value.to(torch.float64, copy=True)

    def subtract(self, contribution: Mapping[str, torch.Tensor]) -> None:
        """Take an owner's contribution back out (it must have been added: every key present, every shape equal)."""
        missing = [key for key in contribution if key not in self]
        if missing:
            raise MergeError(f"{missing[0]!r}: not in the sums, so it cannot be subtracted")
        self.check(contribution)
        for key, value in contribution.items():
            self[key].sub_(value.detach())


class MergeMethod:
    """Base class. Subclasses are dataclasses whose fields are the method's options."""

    name: ClassVar[str] = ""
    needs_statistics: ClassVar[bool] = False
    needs_fisher: ClassVar[bool] = False
    # The owners' data must be in the merging process (RegMean++: its statistics depend on the merge being built).
    needs_data: ClassVar[bool] = False
    needs_base: ClassVar[bool] = False
    # The owners' contributions are relative to the base (task vectors): sums formed against one base fit no other.
    contributes_relative_to_base: ClassVar[bool] = False
    # Options that only ``combine`` reads: methods differing in them alone can share one set of sums.
    combine_only: ClassVar[tuple[str, ...]] = ()

    def contribute(self, owner: OwnerState, context: MergeContext) -> Tensors:
        raise NotImplementedError

    def noise_units(self, key: str, weight_bound: float) -> float | None:
        """Distributed DP: how far one example moves contribution ``key``, in units of ``sqrt(2) clip`` (None: not
        at all; a method that reads statistics and cannot say must not be asked for noise, see ``noisable``)."""
        return None

    @property
    def noisable(self) -> bool:
        """Whether the method can add distributed DP noise to what it releases (it needs no statistics, or says how
        its contributions move with one example)."""
        return not (self.needs_statistics or self.needs_fisher)

    def combine(self, sums: Mapping[str, torch.Tensor], context: MergeContext) -> MergeOutcome:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def sums_key(self) -> tuple:
        """Equal for methods whose contributions are identical, so one aggregation serves them all."""
        return (self.name, tuple(sorted((k, v) for k, v in self.options().items() if k not in self.combine_only)))

    def label(self) -> str:
        """``name`` or ``name:key=value;…`` with the options that differ from the defaults: a folder name."""
        defaults = type(self)().options()
        changed = [f"{k}={v}" for k, v in self.options().items() if defaults.get(k) != v]
        return self.name + (":" + ";".join(changed) if changed else "")


METHODS: dict[str, type[MergeMethod]] = {}


def register(name: str):
    def decorate(cls: type[MergeMethod]) -> type[MergeMethod]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def option_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_method_class(name))]


def get_method(name: str, **options: Any) -> MergeMethod:
    """An instance of the method ``name`` with ``options``; unknown names and options are errors that list the valid."""
    cls = _method_class(name)
    valid = option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise MergeError(
            f"method {name!r} takes no option {', '.join(unknown)}; its options: {', '.join(valid) or 'none'}"
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise MergeError(f"method {name!r}: {error}") from error


def method_from_spec(spec: str) -> MergeMethod:
    """A method from ``name`` or ``name:key=value;key=value`` (the form :meth:`MergeMethod.label` gives)."""
    name, _, rest = spec.strip().partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(";")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise MergeError(f"method spec {spec!r}: option {item!r} is not key=value")
        try:
            options[key.strip()] = float(raw)
        except ValueError:
            options[key.strip()] = raw.strip()
    return get_method(name, **options)


def _method_class(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None


# Shared pieces of the additive methods.


def weighted(params: Mapping[str, torch.Tensor], weight: float, prefix: str = MEAN) -> Tensors:
    """``weight * theta`` for every parameter, and the weight itself, so that sums divide into weighted means."""
    contribution = {prefix + name: value.to(torch.float64) * weight for name, value in params.items()}
    contribution[WEIGHT] = torch.tensor(float(weight), dtype=torch.float64)
    return contribution


def weighted_means(sums: Mapping[str, torch.Tensor], prefix: str = MEAN) -> Tensors:
    total = sums[WEIGHT]
    if float(total) <= 0.0:
        raise MergeError("the owners' weights sum to zero (no examples?): cannot average")
    return {key[len(prefix) :]: value / total for key, value in sums.items() if key.startswith(prefix)}


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_discover()
