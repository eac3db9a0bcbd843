"""Tensors read lazily, one at a time: model folders (one or sharded safetensors files) and statistics files.

A merge of large models must never hold a whole owner: it reads the tensors of one group of layers, uses them and
drops them. :class:`CheckpointFiles` knows from the files' headers alone which tensors a folder holds, with their
shapes and dtypes, and reads a tensor only when asked.

We open the file for each batch of reads and close it after (safetensors' ``safe_open``): the library maps the
whole file, and the pages a read touches count in the process's resident memory for as long as the mapping lives.
Holding every owner's files open through a merge would make its peak memory grow with the owners and the depth.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import GramfuseError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointFiles(Mapping):
    """The tensors of a Hugging Face model folder, by name, read from disk on each access.

    ``shape(name)`` and ``dtype(name)`` come from the headers and read nothing else.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path in self._files():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        view = handle.get_slice(name)
                        self.file_of[name] = path
                        self.shapes[name] = tuple(view.get_shape())
                        self.dtypes[name] = view.get_dtype()
            except Exception as error:  # safetensors raises its own error types for corrupt or truncated headers
                raise GramfuseError(f"{path}: not a readable safetensors file (corrupt or truncated): {error}") from error
        for name, dtype in self.dtypes.items():
            if dtype not in DTYPES:
                raise GramfuseError(f"{self.file_of[name]}: tensor {name!r} has dtype {dtype}, which gramfuse does not "
                                    f"merge (it reads {', '.join(DTYPES)})")
            self.dtypes[name] = DTYPES[dtype]

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise GramfuseError(f"{index}: not a valid safetensors index ({error})") from error
            files = [self.folder / name for name in dict.fromkeys(weight_map.values())]
            for path in files:
                if not path.is_file():
                    raise GramfuseError(f"{index}: names the shard {path.name}, which is missing")
            return files
        single = self.folder / SINGLE_FILE
        if single.is_file():
            return [single]
        raise GramfuseError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read; "
                            "re-save the model with save_pretrained)")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def __contains__(self, name: object) -> bool:
        return name in self.file_of  # from the headers: Mapping's own would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self.dtypes[name]

    def is_float(self, name: str) -> bool:
        return self.dtypes[name].is_floating_point

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors, each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.file_of:
                raise KeyError(name)
            by_file.setdefault(self.file_of[name], []).append(name)
        out = {}
        for path, wanted in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in wanted:
                        out[name] = handle.get_tensor(name)
            except Exception as error:  # truncated data surfaces only when the tensor is read
                raise GramfuseError(f"{path}: cannot read tensor(s) {', '.join(wanted[:3])}: {error}") from error
        return out

    def fingerprint(self, each=None) -> str:
        return fingerprint(self, each)


def fingerprint(files: Mapping, each=None) -> str:
    """:func:`fusion.statistics.weights_fingerprint` of the floating-point tensors of lazily read ``files``
    (:class:`CheckpointFiles`, an adapter's effective tensors), read one at a time, each also handed to
    ``each(name, tensor)`` to check it on the way."""
    from .statistics import WeightsDigest

    digest = WeightsDigest()
    for name in sorted(n for n in files if files.is_float(n)):
        tensor = files[name]
        if each is not None:
            each(name, tensor)
        digest.add(name, tensor)
    return digest.hexdigest()


class Restricted(Mapping):
    """A lazy view of ``source`` limited to ``names``: what a merge method sees of one owner for one group."""

    def __init__(self, source: Mapping, names: Iterable[str]) -> None:
        self.source = source
        self.names = {name: None for name in names if name in source}  # ordered, and a set for membership
        self._cache: dict[str, torch.Tensor] | None = None

    def _loaded(self) -> dict[str, torch.Tensor]:
        if self._cache is None:
            reader = getattr(self.source, "read", None)
            self._cache = reader(list(self.names)) if reader else {name: self.source[name] for name in self.names}
        return self._cache

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self._loaded()[name]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
