"""Helpers of the methods that work on task vectors relative to a base model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import MergeError
from . import MEAN


def split_by_base(
    params: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parameters the base has with the same shape (task vectors apply), and the rest (a head the base lacks)."""
    if base is None:
        raise MergeError("this method works relative to a base model: give one with --base")
    relative, absolute = {}, {}
    for name, value in params.items():
        reference = base.get(name)
        if reference is not None and reference.shape == value.shape:
            relative[name] = value.to(torch.float64)
        else:
            absolute[name] = value
    return relative, absolute


def absent_from_base_warnings(sums: Mapping[str, torch.Tensor]) -> list[str]:
    """Warnings for the parameters that were averaged because the base lacks them (or has another shape)."""
    return [
        f"parameter {key[len(MEAN):]!r}: not in the base model (or of another shape there); averaged instead"
        for key in sorted(sums)
        if key.startswith(MEAN)
    ]
