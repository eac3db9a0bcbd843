"""Secure mode: owners add their contributions under masks, so the server decodes only the sums.

Every merge method is additive (:mod:`fusion.methods`): an owner's part of every sum is computed at its site, with
:func:`secure_contributions`, encoded in fixed point (:mod:`.fixedpoint`), masked (:mod:`.protocol`), and only the
sum over owners is ever decoded. :func:`merge_from_sums` then combines exactly as the plaintext merge does.

What cannot be summed cannot be hidden: an owner whose label set differs from the merged one has a head of its
own, which only it has. It is sent, in the clear, only when that owner asks for it (``share-head``); otherwise it
stays at its site and the owner attaches it to the merged body itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..aggregate import Merged, OwnerUpdate, context_with, contributions
from ..errors import MergeError
from ..methods import MergeContext, MergeMethod, MergeOutcome
from .fixedpoint import BANDS, decode, encode, fraction_bits, magnitude_bands
from .protocol import Layout

BODY, HEAD = "body/", "head/"


def sums_groups(methods: list[MergeMethod]) -> list[MergeMethod]:
    """One method per distinct set of sums (RegMean at every alpha shares one), in order."""
    groups: dict[tuple, MergeMethod] = {}
    for method in methods:
        groups.setdefault(method.sums_key(), method)
    return list(groups.values())


def check_secure_methods(methods: list[MergeMethod]) -> None:
    for method in methods:
        if method.needs_base:
            raise MergeError(f"method {method.label()!r} needs the base model for task vectors, which secure mode "
                             "does not give the sites; use it in plaintext mode")


def secure_contributions(methods: list[MergeMethod], owner: OwnerUpdate, with_head: bool) -> dict[str, torch.Tensor]:
    """Everything ``owner`` adds to the sums of ``methods``, keyed ``<group>/body/<sum>`` and ``<group>/head/<sum>``."""
    check_secure_methods(methods)
    context = context_with(MergeContext(), owner.statistics)
    out = {}
    for index, method in enumerate(sums_groups(methods)):
        body, head = contributions(method, owner, context, with_head)
        out.update({f"{index}/{BODY}{key}": value for key, value in body.items()})
        out.update({f"{index}/{HEAD}{key}": value for key, value in head.items()})
    return out


def layout_of(tensors: Mapping[str, torch.Tensor]) -> Layout:
    return [(key, tuple(tensors[key].shape)) for key in sorted(tensors)]


def merge_from_sums(methods: list[MergeMethod], sums: Mapping[str, torch.Tensor], context: MergeContext,
                    reference_config: Any, own_heads: Mapping[str, tuple[dict, Any]]) -> dict[str, Merged]:
    """Each method's merge from the decoded sums: the merged body and head as ``"."``, and a folder per owner that
    sent its own head, with the merged body."""
    groups = sums_groups(methods)
    results = {}
    for method in methods:
        index = next(i for i, group in enumerate(groups) if group.sums_key() == method.sums_key())
        body = _part(sums, f"{index}/{BODY}")
        head = _part(sums, f"{index}/{HEAD}")
        if not body:
            raise MergeError(f"{method.label()}: no sums to merge")
        body_outcome = method.combine(body, context)
        head_outcome = method.combine(head, context) if head else MergeOutcome({})
        merged = Merged({".": {**body_outcome.params, **head_outcome.params}}, {".": reference_config},
                        shared_head=not own_heads, layers={**body_outcome.layers, **head_outcome.layers},
                        warnings=body_outcome.warnings + head_outcome.warnings)
        for name, (params, config) in own_heads.items():
            merged.outputs[name] = {**body_outcome.params, **params}
            merged.configs[name] = config
        results[method.label()] = merged
    return results


def _part(sums: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in sums.items() if key.startswith(prefix)}


def band_vectors(layout: Layout, contribution: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The ``bounds`` round's vectors: a one-hot magnitude band per tensor of ``layout`` (none where absent)."""
    bands = magnitude_bands({key: contribution[key] for key, _ in layout if key in contribution})
    return {key: bands.get(key, np.zeros(BANDS, dtype=np.uint64)) for key, _ in layout}


def bands_layout(layout: Layout) -> Layout:
    return [(key, (BANDS,)) for key, _ in layout]


def scales_from_bands(band_sums: Mapping[str, np.ndarray], owners: int) -> dict[str, int]:
    """The public fixed-point scale (fraction bits) of every tensor, from the summed bands."""
    return {key: fraction_bits(histogram, owners) for key, histogram in band_sums.items()}


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
