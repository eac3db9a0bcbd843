"""The audit record: what the server received, saved as it came (run config ``record-dir``), and the check of
it against what an owner must keep to itself.

A recorded array *reveals* an owner's tensor when it is that tensor up to scale and offset: same number of
values, Pearson correlation of magnitude ``threshold`` or more, and so far from chance that no comparison among
thousands would reach it by luck (``Z_SCORE`` standard errors, ``1/sqrt(n)`` each). A plaintext reply carries the
Grams and weights themselves (correlation 1); a masked one is uniform noise modulo 2^64 (correlation about
``1/sqrt(n)``), whatever fixed-point scale one guesses, since correlation ignores scale.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
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


def record_reply(path: Path, reply: Message) -> None:
    """Save a reply as it arrived: every array, every bytes value (as uint8), the rest of its configs as metadata.

    For audits (run config ``record-dir``): what the server could have kept of each site.
    """
    from safetensors.numpy import save_file

    arrays, metadata = {}, {}
    for record_name, record in reply.content.items():
        for key, value in record.items():
            name = f"{record_name}/{key}"
            if isinstance(record, ArrayRecord):
                arrays[name] = np.ascontiguousarray(value.numpy())
            elif isinstance(value, bytes):
                arrays[name] = np.frombuffer(value, dtype=np.uint8).copy()
            else:
                metadata[name] = json.dumps(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path), metadata=metadata)
