"""Audit what the server recorded (run config ``record-dir``) against what an owner must keep to itself.

A recorded array *reveals* an owner's tensor when it is that tensor up to scale and offset: same number of
values, Pearson correlation of magnitude ``threshold`` or more, and so far from chance that no comparison among
thousands would reach it by luck (``Z_SCORE`` standard errors, ``1/sqrt(n)`` each). A plaintext reply carries the
Grams and weights themselves (correlation 1); a masked one is uniform noise modulo 2^64 (correlation about
``1/sqrt(n)``), whatever fixed-point scale one guesses, since correlation ignores scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

MIN_VALUES = 64  # below this no correlation is far enough from chance
Z_SCORE = 6.0


def recorded_arrays(record_dir: str | Path) -> dict[str, np.ndarray]:
    """Every array of every recorded reply, as float64 (integers read as the signed values they encode)."""
    arrays = {}
    for path in sorted(Path(record_dir).glob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            if value.dtype == np.uint64:
                value = value.view(np.int64)
            arrays[f"{path.stem}:{key}"] = value.astype(np.float64).reshape(-1)
    return arrays


def revealing(recorded: Mapping[str, np.ndarray], secrets: Mapping[str, torch.Tensor],
              threshold: float = 0.5) -> list[tuple[str, str, float]]:
    """``(recorded array, secret tensor, correlation)`` for every recorded array that reveals a secret tensor."""
    by_size: dict[int, list[tuple[str, np.ndarray]]] = {}
    for name, value in secrets.items():
        flat = value.detach().to(torch.float64).reshape(-1).numpy()
        if flat.size >= MIN_VALUES and flat.std() > 0:
            by_size.setdefault(flat.size, []).append((name, flat))
    found = []
    for key, array in recorded.items():
        if array.size not in by_size or not np.isfinite(array).all() or array.std() == 0:
            continue
        for name, secret in by_size[array.size]:
            correlation = float(np.corrcoef(array, secret)[0, 1])
            if abs(correlation) >= max(threshold, Z_SCORE / np.sqrt(array.size)):
                found.append((key, name, correlation))
    return found
