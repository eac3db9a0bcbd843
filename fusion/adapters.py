"""LoRA adapters (``peft`` folders) as owners: their effective weights ``W0 + scale * B A``, read lazily, and a
low-rank adapter of a merged model.

An owner may be an adapter folder: ``adapter_config.json`` (which names the base model) and
``adapter_model.safetensors`` (``lora_A`` / ``lora_B`` per adapted layer, and whole tensors for the modules it
trains outright, such as a classification head). We read these two files ourselves rather than through ``peft``:
a merge needs each adapted weight one at a time, next to the base's, and peft would build the whole model to give
them. peft is the reference the tests check this reading against.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import GramfuseError
from .lazy import CheckpointFiles, fingerprint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "sequence-classification", "TOKEN_CLS": "token-classification"}


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter folder, read: its base folder, scale, and which base tensors it changes."""

    path: Path
    base: Path
    scale: float
    fan_in_fan_out: bool  # GPT-2's Conv1D stores weights in x out: the delta is (B A)^T
    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)  # adapted weight -> (A key, B key)
    replaced: dict[str, str] = field(default_factory=dict)  # tensor trained outright -> its key
    task: str | None = None  # from peft's task_type, where it names one of ours

    @property
    def modules(self) -> set[str]:
        """The layers the adapter changes: the only ones its statistics need."""
        return {name.removesuffix(".weight") for name in self.pairs}


def open_adapter(path: str | Path, base: str | Path | None = None) -> LoraAdapter:
    """The adapter folder ``path``; ``base`` overrides the base folder its config names."""
    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise GramfuseError(f"{path}: unreadable {ADAPTER_CONFIG}: {error}") from error
    if config.get("peft_type") != "LORA":
        raise GramfuseError(f"{path}: a {config.get('peft_type')!r} adapter; only LoRA adapters are merged")
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern", "lora_bias"):
        if config.get(unsupported):
            raise GramfuseError(f"{path}: the adapter uses {unsupported}, which gramfuse does not merge yet")
    named = base or config.get("base_model_name_or_path")
    if not named or not (Path(named) / "config.json").is_file():
        raise GramfuseError(f"{path}: the adapter's base {named!r} is not a model folder here; give --base BASE_DIR")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights = path / ADAPTER_FILE
    if not weights.is_file():
        raise GramfuseError(f"{path}: no {ADAPTER_FILE}")
    pairs, replaced = {}, {}
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
    for key in keys:
        name = key.removeprefix(PREFIX)
        if name.endswith(LORA_A):
            module = name[: -len(LORA_A)]
            if PREFIX + module + LORA_B not in keys:
                raise GramfuseError(f"{path}: layer {module!r} has lora_A but no lora_B")
            pairs[module + ".weight"] = (key, PREFIX + module + LORA_B)
        elif "lora_" in name:
            if not name.endswith(LORA_B):
                raise GramfuseError(f"{path}: tensor {key!r} is a LoRA variant gramfuse does not merge yet")
        else:
            replaced[name] = key
    return LoraAdapter(path, Path(named), scale, bool(config.get("fan_in_fan_out")), pairs, replaced,
                       PEFT_TASKS.get(str(config.get("task_type"))))


class AdapterFiles(Mapping):
    """An adapter owner's effective tensors, by name, read on each access like :class:`CheckpointFiles`: the base's,
    with ``W0 + scale * B A`` for each adapted weight (computed in float32, stored in the base's dtype, as
    peft's ``merge_and_unload`` does) and the adapter's own tensors where it trained them outright."""

    def __init__(self, adapter: LoraAdapter) -> None:
        self.adapter = adapter
        self.folder = adapter.path
        self.base = CheckpointFiles(adapter.base)
        for name in [*adapter.pairs, *adapter.replaced]:
            if name not in self.base and name not in adapter.replaced:
                raise GramfuseError(f"{adapter.path}: the adapter changes {name!r}, which its base "
                                    f"{adapter.base} does not hold (another base model?)")
        self.names = list(dict.fromkeys([*self.base, *adapter.replaced]))

    @property
    def changed(self) -> set[str]:
        """The tensors the adapter changes; every other one is its base's, bit for bit."""
        return set(self.adapter.pairs) | set(self.adapter.replaced)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def __contains__(self, name: object) -> bool:
        return name in self.base or name in self.adapter.replaced

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def _own(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        with safe_open(str(self.adapter.path / ADAPTER_FILE), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.adapter.replaced:
            return tuple(self._own([self.adapter.replaced[name]])[self.adapter.replaced[name]].shape)
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name) if name in self.base else self.read([name])[name].dtype

    def is_float(self, name: str) -> bool:
        return self.dtype(name).is_floating_point

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        adapter = self.adapter
        out = self.base.read([n for n in names if n not in adapter.replaced])
        keys = [adapter.replaced[n] for n in names if n in adapter.replaced]
        keys += [key for n in names if n in adapter.pairs for key in adapter.pairs[n]]
        own = self._own(keys)
        for name in names:
            if name in adapter.replaced:
                out[name] = own[adapter.replaced[name]]
            elif name in adapter.pairs:
                first, second = adapter.pairs[name]
                delta = adapter.scale * (own[second].float() @ own[first].float())
                base = out[name]
                if adapter.fan_in_fan_out:
                    delta = delta.T
                if delta.shape != base.shape:
                    raise GramfuseError(f"{adapter.path}: layer {name!r}: B A has shape {tuple(delta.shape)}, the "
                                        f"base weight {tuple(base.shape)}")
                out[name] = (base.float() + delta).to(base.dtype)
        return out

    def fingerprint(self, each=None) -> str:
        return fingerprint(self, each)  # of the effective tensors, as a merge reads them


def checkpoint_files(path: str | Path, base: str | Path | None = None) -> CheckpointFiles | AdapterFiles:
    """The lazily read tensors of a model folder or of an adapter folder (its effective weights)."""
    return AdapterFiles(open_adapter(path, base)) if is_adapter(path) else CheckpointFiles(path)


def model_folder(path: str | Path, base: str | Path | None = None) -> Path:
    """Where a folder's config (and, failing its own, tokenizer) live: the folder, or an adapter's base."""
    return open_adapter(path, base).base if is_adapter(path) else Path(path)


def apply_adapter(model: Any, adapter: LoraAdapter) -> Any:
    """The base ``model`` (loaded from the adapter's base) given the adapter's effective weights, in place."""
    files = AdapterFiles(adapter)
    changed = files.read([*adapter.pairs, *adapter.replaced])
    state = model.state_dict()
    unknown = sorted(set(changed) - set(state))
    if unknown:
        raise GramfuseError(f"{adapter.path}: the adapter changes {unknown[0]!r}, which the model lacks")
    with torch.no_grad():
        for name, value in changed.items():
            state[name].copy_(value)
    return model


def lora_of_merge(base: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor], modules: dict[str, str],
                  rank: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A rank-``rank`` LoRA of ``merged - base`` for ``modules`` (name -> kind), by truncated SVD, and each layer's
    relative Frobenius error ``||D - B A|| / ||D||``. Tensors are named as peft saves them, with scale 1."""
    from .gram import CONV1D

    tensors, errors = {}, {}
    for module, kind in modules.items():
        name = module + ".weight"
        delta = merged[name].double() - base[name].double()
        if kind == CONV1D:
            delta = delta.T  # peft's fan_in_fan_out: B A is out x in, stored transposed
        left, values, right = torch.linalg.svd(delta, full_matrices=False)
        kept = min(rank, values.numel())
        lora_b = left[:, :kept] * values[:kept]
        lora_a = right[:kept]
        if kept < rank:  # a layer narrower than the rank: pad with zeros so every layer has rank r
            lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - kept)], dim=1)
            lora_a = torch.cat([lora_a, lora_a.new_zeros(rank - kept, lora_a.shape[1])])
        norm = float(values.square().sum().sqrt())
        errors[module] = float(values[kept:].square().sum().sqrt()) / norm if norm > 0 else 0.0
        tensors[PREFIX + module + LORA_A] = lora_a.float().contiguous()
        tensors[PREFIX + module + LORA_B] = lora_b.float().contiguous()
    return tensors, errors
