"""Examples to tokenised batches, labelled as each task's model computes its loss.

The attention mask of every batch marks the real tokens, and it is what the Gram statistics count: pads never do,
whatever the task. Batches are padded on the right, so that decoder-only models see positions from 0 and find an
example's last token (a sequence classifier's pooled one) where transformers looks for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data import Example, Fields, class_index, score_value
from .errors import DataError
from .tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, Task, is_regression

IGNORED = -100  # transformers' loss ignores this label: pads, and sub-tokens after a word's first


def task_fields(task: Task, text_field: str | None = None, label_field: str | None = None,
                pair_field: str = "text_pair") -> Fields:
    """The fields a task reads, with the user's names where given."""
    return Fields(
        text=text_field or task.text_field,
        label=(label_field or task.label_field) if task.label_field else None,
        pair=pair_field if task.name == SEQUENCE_CLASSIFICATION else None,
        words=task.name == TOKEN_CLASSIFICATION,
    )


class Encoder:
    """``encoder(examples) -> batch``: model inputs and, when ``labelled``, ``labels``. Labels present in the data
    are checked against the model either way, so a bad one is found by the statistics pass, not later."""

    def __init__(self, task: Task, tokenizer: Any, config: Any, *, max_length: int, path: str | Path,
                 labelled: bool = True) -> None:
        if task.name == TOKEN_CLASSIFICATION and not getattr(tokenizer, "is_fast", False):
            raise DataError(f"token classification needs a fast tokenizer (it maps sub-tokens to words); "
                            f"{type(tokenizer).__name__} is not one")
        tokenizer.padding_side = "right"
        self.task, self.tokenizer, self.config = task, tokenizer, config
        self.max_length, self.path, self.labelled = max_length, path, labelled

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        encode = {SEQUENCE_CLASSIFICATION: self._sequences, TOKEN_CLASSIFICATION: self._words,
                  CAUSAL_LM: self._texts}[self.task.name]
        batch = encode(examples)
        if not self.labelled:
            batch.pop("labels", None)
        return batch

    def _tokenize(self, texts: list, pairs: list | None = None, **options: Any):
        return self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt", **options)

    def _class(self, label: Any, line: int) -> int:
        return class_index(label, line, self.config.label2id, self.config.num_labels, self.path)

    def _sequences(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        pairs = [e.pair for e in examples] if examples[0].pair is not None else None
        batch = dict(self._tokenize([e.text for e in examples], pairs))
        present = [e for e in examples if e.label not in (None, "")]
        if is_regression(self.config):
            scores = [score_value(e, self.path) for e in present]
            if len(present) == len(examples):
                batch["labels"] = torch.tensor(scores, dtype=torch.float32)
        else:
            classes = [self._class(e.label, e.line) for e in present]
            if len(present) == len(examples):
                batch["labels"] = torch.tensor(classes, dtype=torch.long)
        return batch

    def _words(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        encoded = self._tokenize([e.text for e in examples], is_split_into_words=True)
        labels = torch.full_like(encoded["input_ids"], IGNORED)
        for row, example in enumerate(examples):
            if example.label is None:
                continue
            tags = [self._class(tag, example.line) for tag in example.label]
            previous = None
            for position, word in enumerate(encoded.word_ids(row)):
                if word is not None and word != previous:
                    labels[row, position] = tags[word]
                previous = word
        batch = dict(encoded)
        if all(e.label is not None for e in examples):
            batch["labels"] = labels
        return batch

    def _texts(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        batch = dict(self._tokenize([e.text for e in examples]))
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORED)
        return batch
