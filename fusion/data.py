"""Labelled text files (JSONL or CSV) read as a stream, and batches for a tokenizer.

The file is never held in memory whole: a data site's file may be larger than its RAM, and statistics need one pass.
Every problem is reported with the file, the line and the field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DataError


@dataclass(frozen=True)
class Example:
    line: int
    text: str
    label: Any = None  # as written in the file: an int, or a name to look up in the model's label2id


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl or .csv (with text,label columns)")


def _rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    kind = _file_format(path)
    with path.open(encoding="utf-8", newline="") as handle:
        if kind == "jsonl":
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object per line, found {type(row).__name__}")
                yield number, row
        else:
            reader = csv.DictReader(handle, delimiter="\t" if kind == "tsv" else ",")
            for row in reader:
                yield reader.line_num, row


def read_examples(
    path: str | Path, text_field: str = "text", label_field: str = "label", require_labels: bool = True
) -> Iterator[Example]:
    """Stream the examples of a data file; raises :class:`DataError` naming file, line and field on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    count = 0
    for number, row in _rows(path):
        text = row.get(text_field)
        if text is None:
            raise DataError(f"{path}:{number}: missing field {text_field!r} (fields: {', '.join(map(str, row))})")
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: field {text_field!r} must be text, found {type(text).__name__}")
        label = row.get(label_field)
        if label in (None, "") and require_labels:
            raise DataError(f"{path}:{number}: missing field {label_field!r}")
        count += 1
        yield Example(number, text, label)
    if count == 0:
        raise DataError(f"{path}: no examples (the file is empty)")


def count_examples(path: str | Path) -> int:
    """Non-blank lines: the total for a progress bar without parsing the file."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such data file")
    with Path(path).open(encoding="utf-8", newline="") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines - 1 if _file_format(Path(path)) != "jsonl" else lines


def label_index(example: Example, label2id: Mapping[str, int], num_labels: int, path: str | Path) -> int:
    """The class index of an example's label, checked against the model's label range."""
    label = example.label
    if isinstance(label, str) and label in label2id:
        return int(label2id[label])
    try:
        index = int(label)
    except (TypeError, ValueError):
        raise DataError(
            f"{path}:{example.line}: label {label!r} is neither a class index nor one of the model's labels "
            f"{sorted(label2id)}"
        ) from None
    if isinstance(label, float) and label != index:
        raise DataError(f"{path}:{example.line}: label {label!r} is not a whole class index")
    if not 0 <= index < num_labels:
        raise DataError(f"{path}:{example.line}: label {label!r} is outside the model's range 0..{num_labels - 1}")
    return index


def batches(
    examples: Iterator[Example],
    tokenizer: Any,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    label_of: Any = None,
    max_examples: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches, padded to their longest member; with ``label_of`` (Example -> int) they carry ``labels``."""
    chunk: list[Example] = []

    def encode(group: list[Example]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(
            [e.text for e in group], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batch = dict(encoded)
        if label_of is not None:
            batch["labels"] = torch.tensor([label_of(e) for e in group], dtype=torch.long)
        return batch

    for taken, example in enumerate(examples):
        if max_examples is not None and taken >= max_examples:
            break
        chunk.append(example)
        if len(chunk) == batch_size:
            yield encode(chunk)
            chunk = []
    if chunk:
        yield encode(chunk)
