"""Helpers of the methods that work on task vectors relative to a base model."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

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


# A transformer block's parameters: BERT ``encoder.layer.3.``, Llama ``model.layers.3.``, GPT-2 ``transformer.h.3.``,
# T5 ``encoder.block.3.`` (each stack of blocks counted apart: its prefix).
BLOCK = re.compile(r"^(.*?\.(?:layer|layers|h|block))\.(\d+)\.")


def depth_scalings(names: Iterable[str], alpha: float, beta: float) -> dict[str, float]:
    """LiNeS (Wang et al., ICLR 2025): the task vector of block ``l`` of ``L`` (from 1) is scaled by
    ``alpha + beta (l - 1) / (L - 1)``, so shallow layers stay near the base and deep ones take the merge; parameters
    outside the blocks (embeddings, final norm, head) by ``alpha``. Blocks are counted per stack (an encoder's and a
    decoder's apart)."""
    names = list(names)
    found = {name: BLOCK.match(name) for name in names}
    depth: dict[str, int] = {}
    for match in filter(None, found.values()):
        depth[match.group(1)] = max(depth.get(match.group(1), 0), int(match.group(2)) + 1)
    out = {}
    for name, match in found.items():
        blocks = depth[match.group(1)] if match else 0
        out[name] = alpha + beta * int(match.group(2)) / (blocks - 1) if match and blocks > 1 else alpha
    return out
