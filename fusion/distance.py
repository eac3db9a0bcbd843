"""How far a merge lies from each owner's model: ``||merged - own|| / ||own||`` over the weights they share.

A merge that sits on one owner's model and far from the others' is what an owner who inflates its statistics
achieves; this measure makes it visible. Computing it exactly would need every owner's weights next to the merged
ones, which a server folding replies into sums part by part never holds. So each owner's squared norm is summed
exactly as its tensors go by, and the squared difference is estimated from a fixed sample of at most ``SAMPLE``
entries per tensor (the same entries for every owner and for the merge, drawn from the tensor's name), scaled to the
tensor's size. Tensors no larger than the sample are compared whole, exactly. Memory: ``SAMPLE`` float32 values per
tensor and owner (64 KB; 19 MB per owner of a 7 B-parameter model).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

SAMPLE = 16384  # entries compared per tensor: a relative error of about 1% on a tensor's distance


def sample_positions(name: str, numel: int, size: int = SAMPLE) -> torch.Tensor | None:
    """The entries of tensor ``name`` that stand for it (with replacement); None: all of them."""
    if numel <= size:
        return None
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
    return torch.randint(0, numel, (size,), generator=torch.Generator().manual_seed(seed))


class OwnerDistances:
    """Fed each owner's tensors (:meth:`observe`) and each method's merged tensors (:meth:`compare`), in any order
    of parts; :meth:`relative` gives every method's distance from every owner."""

    def __init__(self, sample: int = SAMPLE) -> None:
        self.sample = sample
        self.samples: dict[str, dict[str, torch.Tensor]] = {}  # owner -> tensor -> its sampled entries
        self.norms: dict[str, dict[str, float]] = {}  # owner -> tensor -> its exact squared norm
        self.shapes: dict[str, dict[str, tuple[int, ...]]] = {}  # owner -> tensor -> its shape
        self.squared: dict[str, dict[str, float]] = {}  # method -> owner -> estimated squared distance
        self.own_norms: dict[str, dict[str, float]] = {}  # method -> owner -> squared norm of the tensors compared

    def _entries(self, name: str, value: torch.Tensor) -> torch.Tensor:
        flat = value.detach().reshape(-1)
        positions = sample_positions(name, flat.numel(), self.sample)
        return (flat if positions is None else flat[positions]).to(torch.float32).clone()

    def observe(self, owner: str, params: Mapping[str, torch.Tensor]) -> None:
        for name, value in params.items():
            if not value.is_floating_point():
                continue
            self.samples.setdefault(owner, {})[name] = self._entries(name, value)
            self.norms.setdefault(owner, {})[name] = float(value.detach().to(torch.float64).square().sum())
            self.shapes.setdefault(owner, {})[name] = tuple(value.shape)

    def compare(self, method: str, merged: Mapping[str, torch.Tensor]) -> None:
        for name, value in merged.items():
            merged_entries = None
            for owner, samples in self.samples.items():
                own = samples.get(name)
                if own is None or self.shapes[owner][name] != tuple(value.shape):
                    continue  # a head of another label set, or a tensor this owner never sent
                if merged_entries is None:
                    merged_entries = self._entries(name, value).to(torch.float64)
                scale = value.numel() / own.numel()
                difference = float((merged_entries - own.to(torch.float64)).square().sum()) * scale
                self.squared.setdefault(method, {}).setdefault(owner, 0.0)
                self.squared[method][owner] += difference
                self.own_norms.setdefault(method, {}).setdefault(owner, 0.0)
                self.own_norms[method][owner] += self.norms[owner][name]

    def relative(self) -> dict[str, dict[str, float]]:
        """Method -> owner -> ``||merged - own|| / ||own||`` over the tensors compared."""
        return {method: {owner: math.sqrt(squared) / math.sqrt(self.own_norms[method][owner])
                         if self.own_norms[method][owner] > 0 else math.inf
                         for owner, squared in by_owner.items()}
                for method, by_owner in self.squared.items()}
