"""Secure mode: owners add their contributions under masks, so the server decodes only the sums.

Every merge method is additive (:mod:`fusion.methods`): an owner's part of every sum is computed at its site, with
:func:`secure_contributions`, encoded in fixed point (:mod:`.fixedpoint`), masked (:mod:`.protocol`), and only the
sum over owners is ever decoded. :func:`finish_from_sums` then combines and writes exactly as the plaintext merge does.

What cannot be summed cannot be hidden: an owner whose label set differs from the merged one has a head of its
own, which only it has. It is sent, in the clear, only when that owner asks for it (``share-head``); otherwise it
stays at its site and the owner attaches it to the merged body itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..aggregate import OwnerUpdate, context_with, contributions
from ..errors import MergeError
from ..finish import Finisher, Group, SumsOf, plan_groups, plan_outputs, restrict
from ..methods import MEAN, MergeContext, MergeMethod, OwnerState, Sums
from ..methods.regmean import needs_diagonal
from ..privacy import TAIL_SIGMAS, NoiseShares, PrivacyError
from ..statistics import ModuleInfo
from .fixedpoint import BANDS, BOUND_FACTOR, agreed_band, bound_bands, decode, encode, fraction_bits, magnitude_bands

BODY, HEAD = "body/", "head/"
Layout = list[tuple[str, tuple[int, ...]]]  # the sums' tensors, by name and shape, in the order they are masked


def sums_groups(methods: list[MergeMethod]) -> list[MergeMethod]:
    """One method per distinct set of sums (RegMean at every alpha shares one), in order."""
    groups: dict[tuple, MergeMethod] = {}
    for method in methods:
        groups.setdefault(method.sums_key(), method)
    return list(groups.values())


def check_secure_methods(methods: list[MergeMethod]) -> None:
    for method in methods:
        if method.needs_base:
            # Task arithmetic and TIES form task vectors at the sites, which secure mode does not give the base;
            # RegMean's LiNeS needs it at the server only, but the secure finish does not load it (not built).
            raise MergeError(f"method {method.label()!r} works relative to the base model, which secure mode does "
                             "not use; use it in plaintext mode")


def secure_contributions(methods: list[MergeMethod], owner: OwnerUpdate, with_head: bool,
                         noise: NoiseShares | None = None, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Everything ``owner`` adds to the sums of ``methods``, keyed ``<group>/body/<sum>`` and ``<group>/head/<sum>``;
    with ``noise``, its share of the run's distributed DP noise on everything that depends on its examples.

    With ``names`` (tensors, layers, Grams: a few groups of layers), only the sums of those, formed from the weights
    they need, and the owner-wide sums of both sides (the example weight, the owner count) whatever the names."""
    check_secure_methods(methods)
    if noise is not None:
        unable = [method.label() for method in methods if not method.noisable]
        if unable:
            raise PrivacyError(f"method {unable[0]!r} cannot add distributed DP noise to what it sends (only "
                               "regmean, and methods without statistics, can)")
    context = context_with(MergeContext(diagonal=needs_diagonal(methods), noise=noise), owner.statistics)
    part = owner if names is None else restricted(owner, set(names))
    has_head = bool(owner.split()[1]) and with_head
    out = {}
    for index, method in enumerate(sums_groups(methods)):
        body, head = contributions(method, part, context, with_head)
        if has_head and not head:  # the part holds none of the head: its owner-wide sums all the same
            head = method.contribute(OwnerState(owner.name, {}, owner.statistics), context)
        out.update({f"{index}/{BODY}{key}": value for key, value in body.items()})
        out.update({f"{index}/{HEAD}{key}": value for key, value in head.items()})
    return out


def restricted(owner: OwnerUpdate, names: set[str]) -> OwnerUpdate:
    """``owner`` with only the weights that the sums of ``names`` (tensors, layers, Grams) are formed from: those
    named, and those of the layers named (a layer's ``G W^T`` needs its weight)."""
    modules = owner.statistics.modules if owner.statistics is not None else {}
    weights = names | {modules[name].weight for name in names if name in modules}
    return replace(owner, params={name: value for name, value in owner.params.items() if name in weights})


def _split_key(key: str) -> tuple[int, str]:
    """``<group>/body/<sum>`` or ``<group>/head/<sum>`` -> (group, sum)."""
    index, _, rest = key.partition("/")
    return int(index), rest.partition("/")[2]


def noised_units(methods: list[MergeMethod], layout: Layout, weight_bound: float) -> dict[str, float]:
    """Distributed DP: the tensors of the agreed ``layout`` that carry noise, with their sensitivity to one example
    in units of ``sqrt(2) clip``. Every site computes it from the same layout, so they agree on the release count
    that calibrates everyone's share (:class:`fusion.privacy.NoiseShares`)."""
    groups = sums_groups(methods)
    units = {}
    for key, _ in layout:
        index, rest = _split_key(key)
        value = groups[index].noise_units(rest, weight_bound)
        if value is not None:
            units[key] = value
    return units


def public_bounds(units: Mapping[str, float], noise: NoiseShares, example_count: int) -> dict[str, torch.Tensor]:
    """What the ``bounds`` round reports for noised tensors instead of their magnitude: a bound from public numbers.
    ``N`` examples of share at most ``clip`` give a Gram of Frobenius norm at most ``N clip`` (times ``||W||_2``
    for a product), and a share of noise stays within :data:`fusion.privacy.TAIL_SIGMAS` deviations; a site's own
    largest entry (a little of its data, and outside the guarantee) never reaches the server."""
    return {key: torch.tensor(example_count * noise.clip * unit + TAIL_SIGMAS * noise.std(unit), dtype=torch.float64)
            for key, unit in units.items()}


def layout_of(tensors: Mapping[str, torch.Tensor]) -> Layout:
    return [(key, tuple(tensors[key].shape)) for key in sorted(tensors)]


def sums_plan(methods: list[MergeMethod], keys: Iterable[str], modules: Mapping[str, ModuleInfo]) -> list[Group]:
    """The groups that sums keyed ``keys`` (the agreed layout's, or the decoded sums') merge, in checkpoint order."""
    keys = list(keys)
    body = sorted(key[len(f"0/{BODY}"):] for key in keys if key.startswith(f"0/{BODY}"))
    head = sorted(key[len(f"0/{HEAD}"):] for key in keys if key.startswith(f"0/{HEAD}"))
    if not body:
        raise MergeError("no sums to merge")
    names = [key[len(MEAN):] for key in body + head if key.startswith(MEAN)]
    return plan_groups(names, {key[len(MEAN):] for key in head if key.startswith(MEAN)}, modules)


def sums_parts(layout: Layout, groups: list[Group], part_bytes: int) -> list[tuple[list[Group], Layout]]:
    """Consecutive ``groups`` in parts whose server-side sums (a masked 64-bit total and its float64 decoding per
    value) stay under ``part_bytes`` (a group larger than that is a part of its own), each with its share of
    ``layout``. Owner-wide sums (the weight total, the owner count) go with the first part, once: released again
    in a later part without an owner that dropped, they would tell that owner's by difference."""
    group_of: dict[tuple[bool, str], int] = {}
    for position, group in enumerate(groups):
        for key in group.keys:
            group_of[group.head, key] = position
    by_group: dict[int, Layout] = {}
    for key, shape in layout:
        _, side, rest = key.split("/", 2)
        name = rest.split("/", 1)[1] if "/" in rest else None
        position = group_of.get((f"{side}/" == HEAD, name), 0) if name is not None else 0
        by_group.setdefault(position, []).append((key, shape))
    parts: list[tuple[list[Group], Layout]] = []
    used = 0
    for position, group in enumerate(groups):
        entries = by_group.get(position, [])
        size = 16 * sum(int(np.prod(shape, dtype=np.int64)) for _, shape in entries)
        if not parts or (parts[-1][0] and used + size > part_bytes):
            parts.append(([], []))
            used = 0
        parts[-1][0].append(group)
        parts[-1][1].extend(entries)
        used += size
    order = {key: index for index, (key, _) in enumerate(layout)}
    return [(part_groups, sorted(entries, key=lambda entry: order[entry[0]])) for part_groups, entries in parts]


def sums_of_decoded(methods: list[MergeMethod], sums: Mapping[str, torch.Tensor]) -> SumsOf:
    """``sums_of(method, group)`` over decoded sums keyed as the layout (all of them, or a part's and the
    owner-wide ones)."""
    keys = [group.sums_key() for group in sums_groups(methods)]
    parts = [(_part(sums, f"{index}/{BODY}"), _part(sums, f"{index}/{HEAD}")) for index in range(len(keys))]

    def sums_of(method: MergeMethod, group: Group) -> Sums:
        body_part, head_part = parts[keys.index(method.sums_key())]
        return restrict(head_part if group.head else body_part, group)

    return sums_of


def owner_wide(sums: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sums every group needs (``<group>/body/weight``, the owner count, …): no tensor name after the sum's."""
    return {key: value for key, value in sums.items() if "/" not in key.split("/", 2)[2]}


def finish_from_sums(roots: Mapping[str, Path], methods: list[MergeMethod], sums: Mapping[str, torch.Tensor],
                     context: MergeContext, owners: Mapping[str, tuple[tuple, Any]],
                     own_heads: Mapping[str, Mapping[str, torch.Tensor]], reference: tuple, *,
                     report: Mapping[str, Any], tokenizer: Any = None,
                     dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """Each method's merge from the decoded sums, through the one finish of every mode: the merged body and the
    ``reference`` label set's summed head, and a folder per owner that sent its own head.

    ``owners``: owner name -> (label set, config), in precedence order. Sites send float32 weights today: the
    merged model is saved in ``dtype``.
    """
    groups = sums_plan(methods, sums, context.modules)
    finisher = secure_finisher(roots, methods, groups, context, owners, own_heads, reference, tokenizer=tokenizer,
                               dtype=dtype)
    finisher.add(groups, sums_of_decoded(methods, sums))
    return finisher.close(secure_report(report, owners))


def secure_finisher(roots: Mapping[str, Path], methods: list[MergeMethod], groups: list[Group],
                    context: MergeContext, owners: Mapping[str, tuple[tuple, Any]],
                    own_heads: Mapping[str, Mapping[str, torch.Tensor]], reference: tuple, *, tokenizer: Any = None,
                    dtype: torch.dtype = torch.float32) -> Finisher:
    """The finish of decoded sums, to be fed group by group (a part of the model at a time)."""
    label_sets = {name: labels for name, (labels, _) in owners.items()}
    outputs = plan_outputs(list(owners), label_sets, {name: config for name, (_, config) in owners.items()},
                           own_heads, reference)
    dtypes = {name: dtype for group in groups for name in group.tensors}
    return Finisher(roots, methods, context, outputs, dtypes, tokenizer=tokenizer)


def secure_report(report: Mapping[str, Any], owners: Mapping[str, tuple[tuple, Any]]) -> dict[str, Any]:
    return {**report, "shared_label_set": len({labels for labels, _ in owners.values()}) == 1}


def _part(sums: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in sums.items() if key.startswith(prefix)}


def band_vectors(layout: Layout, chunks: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """The ``bounds`` round's vectors: a one-hot magnitude band per tensor of ``layout`` (none where absent), from a
    contribution in chunks (a later chunk's tensor stands for an earlier one of the same name)."""
    wanted = {key for key, _ in layout}
    bands = {}
    for chunk in chunks:
        bands.update(magnitude_bands({key: value for key, value in chunk.items() if key in wanted}))
    return {key: bands.get(key, np.zeros(BANDS, dtype=np.uint64)) for key, _ in layout}


def bands_layout(layout: Layout) -> Layout:
    return [(key, (BANDS,)) for key, _ in layout]


def scales_from_bands(band_sums: Mapping[str, np.ndarray], owners: int,
                      bound_factor: float = BOUND_FACTOR) -> dict[str, int]:
    """The public fixed-point scale (fraction bits) of every tensor, from the summed bands, under the agreed bound
    (``bound_factor`` times the owners' median magnitude; 0: none)."""
    bands = bound_bands(bound_factor)
    return {key: fraction_bits(histogram, owners, bands) for key, histogram in band_sums.items()}


def owners_above_bound(band_sums: Mapping[str, np.ndarray], bound_factor: float = BOUND_FACTOR) -> dict[str, int]:
    """Tensor -> how many owners lie above the agreed bound (those tensors only): they cannot encode, and drop out."""
    bands = bound_bands(bound_factor)
    above = {key: agreed_band(histogram, bands)[1] for key, histogram in band_sums.items()}
    return {key: count for key, count in above.items() if count}


def encoded_vectors(layout: Layout, contribution: Mapping[str, torch.Tensor], scales: Mapping[str, int],
                    owners: int) -> dict[str, np.ndarray]:
    """The ``sums`` round's vectors: every tensor of ``layout`` in fixed point (zeros where this owner adds none)."""
    out = {}
    for key, shape in layout:
        value = contribution.get(key)
        if value is None:
            out[key] = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=np.uint64)
        elif tuple(value.shape) != tuple(shape):
            raise MergeError(f"tensor {key!r}: shape {tuple(value.shape)}, the agreed layout says {tuple(shape)}")
        else:
            out[key] = encode(key, value, scales[key], owners)
    return out


def decoded_sums(layout: Layout, totals: Mapping[str, np.ndarray], scales: Mapping[str, int]) -> dict[str, torch.Tensor]:
    return {key: decode(key, totals[key], scales[key], shape) for key, shape in layout}
