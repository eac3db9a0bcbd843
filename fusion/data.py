"""Labelled text files (JSONL or CSV) read as a stream, and batches for a tokenizer.

The file is never held in memory whole: a data site's file may be larger than its RAM, and statistics need one pass.
Every problem is reported with the file, the line and the field.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DataError


@dataclass(frozen=True)
class Fields:
    """Which fields of a row hold what. ``words``: the text is a list of words and the label a list of tags, one per
    word (token classification); ``label`` None: the text is its own target (causal LM)."""

    text: str = "text"
    label: str | None = "label"
    pair: str | None = "text_pair"  # the second text of a sentence pair, where a row has it
    words: bool = False
    target: bool = False  # the label is a text (seq2seq)


@dataclass(frozen=True)
class Example:
    line: int
    text: Any  # a text, or a list of words
    label: Any = None  # as written in the file: an int, a name to look up in the model's label2id, a score, tags
    pair: str | None = None


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl or .csv (with text,label columns)")


def _decoded(path: Path, number: int, line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}:{number}: not valid UTF-8 (byte {error.start + 1} of the line: "
                        f"{line[error.start:error.start + 1]!r}); save the file as UTF-8") from None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's lines, decoded one at a time so that a bad byte is reported with its line."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, _decoded(path, number, line)


def _rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    kind = _file_format(path)
    if kind == "jsonl":
        for number, line in _text_lines(path):
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
        reader = csv.DictReader((line for _, line in _text_lines(path)), delimiter="\t" if kind == "tsv" else ",")
        for row in reader:
            yield reader.line_num, row


def _text(path: Path, number: int, row: Mapping[str, Any], field: str, words: bool) -> Any:
    value = row.get(field)
    if value is None:
        raise DataError(f"{path}:{number}: missing field {field!r} (fields: {', '.join(map(str, row))})")
    if words:
        if not isinstance(value, list) or not value or not all(isinstance(word, str) for word in value):
            raise DataError(f"{path}:{number}: field {field!r} must be a non-empty list of words (strings)")
    elif not isinstance(value, str):
        raise DataError(f"{path}:{number}: field {field!r} must be text, found {type(value).__name__}")
    return value


def _label(path: Path, number: int, row: Mapping[str, Any], fields: Fields, text: Any, required: bool) -> Any:
    label = row.get(fields.label)
    if label in (None, ""):
        if required:
            raise DataError(f"{path}:{number}: missing field {fields.label!r}")
        return None
    if fields.target and not isinstance(label, str):
        raise DataError(f"{path}:{number}: field {fields.label!r} must be the target text, found {type(label).__name__}")
    if fields.words:
        if not isinstance(label, list):
            raise DataError(f"{path}:{number}: field {fields.label!r} must be a list of tags, one per word")
        if len(label) != len(text):
            raise DataError(f"{path}:{number}: {len(label)} tags in {fields.label!r} for {len(text)} words in "
                            f"{fields.text!r}: tags must align with words")
    return label


def missing_data_file(path: str | Path) -> DataError:
    """The error of a data file that is not there; the server may be told (the path is the site's own setting)."""
    return DataError(f"{path}: no such data file", public="no such data file at the site's data-path")


def read_examples(path: str | Path, fields: Fields = Fields(), require_labels: bool = True) -> Iterator[Example]:
    """Stream the examples of a data file; raises :class:`DataError` naming file, line and field on any problem.

    A file of sentence pairs has the ``pair`` field on every row: a file that mixes pairs and single texts is an
    error (the model was fine-tuned on one or the other).
    """
    path = Path(path)
    if not path.is_file():
        raise missing_data_file(path)
    count, paired = 0, None
    for number, row in _rows(path):
        text = _text(path, number, row, fields.text, fields.words)
        pair = row.get(fields.pair) if fields.pair and not fields.words else None
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"{path}:{number}: field {fields.pair!r} must be text, found {type(pair).__name__}")
        if paired is None:
            paired = pair is not None
        elif paired != (pair is not None):
            raise DataError(f"{path}:{number}: {'no' if paired else 'a'} {fields.pair!r} field, unlike the first "
                            "example: a file holds sentence pairs throughout or single texts throughout")
        label = _label(path, number, row, fields, text, require_labels) if fields.label else None
        count += 1
        yield Example(number, text, label, pair)
    if count == 0:
        raise DataError(f"{path}: no examples (the file is empty)")


def count_examples(path: str | Path) -> int:
    """Non-blank lines: the total for a progress bar without parsing the file."""
    if not Path(path).is_file():
        raise missing_data_file(path)
    with Path(path).open("rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines - 1 if _file_format(Path(path)) != "jsonl" else lines


def class_index(label: Any, line: int, label2id: Mapping[str, int], num_labels: int, path: str | Path) -> int:
    """The class index of a label as written (an index or a label name), checked against the model's label range."""
    if isinstance(label, str) and label in label2id:
        return int(label2id[label])
    try:
        index = int(label)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
        raise DataError(
            f"{path}:{line}: label {label!r} is neither a class index nor one of the model's labels {sorted(label2id)}"
        ) from None
    if isinstance(label, float) and label != index:
        raise DataError(f"{path}:{line}: label {label!r} is not a whole class index")
    if not 0 <= index < num_labels:
        raise DataError(f"{path}:{line}: label {label!r} is outside the model's range 0..{num_labels - 1}")
    return index


def score_value(example: Example, path: str | Path) -> float:
    """A regression target (STS-B's similarity): a finite number."""
    try:
        value = float(example.label)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{example.line}: label {example.label!r} is not a number (the model is a "
                        "regressor: num_labels is 1)") from None
    if not math.isfinite(value):
        raise DataError(f"{path}:{example.line}: label {example.label!r} is not finite")
    return value


def batches(examples: Iterator[Example], encode: Any, *, batch_size: int = 32,
            max_examples: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """``encode(examples)`` of consecutive groups of ``batch_size`` examples (:class:`fusion.encode.Encoder`)."""
    chunk: list[Example] = []
    for taken, example in enumerate(examples):
        if max_examples is not None and taken >= max_examples:
            break
        chunk.append(example)
        if len(chunk) == batch_size:
            yield encode(chunk)
            chunk = []
    if chunk:
        yield encode(chunk)
