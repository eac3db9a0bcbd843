"""Examples to tokenised batches, labelled as each task's model computes its loss.

The attention mask of every batch marks the real tokens, and it is what the Gram statistics count: pads never do,
whatever the task. Batches are padded on the right, so that decoder-only models see positions from 0 and find an
example's last token (a sequence classifier's pooled one) where transformers looks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data import Example, Fields, class_index, score_value
from .errors import DataError
from .tasks import CAUSAL_LM, SEQ2SEQ, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, Task, is_regression

IGNORED = -100  # transformers' loss ignores this label: pads, and sub-tokens after a word's first
# Texts are cut to this many characters per token of max_length before tokenising: a tokenizer's memory grows with
# the whole text (a 30 MB line took 4.6 GB), and a token averages a few characters, so the cut never reaches the
# tokens that truncation keeps (short of text whose tokens average over 32 characters).
CHARS_PER_TOKEN = 32
# Models whose position ids start after the padding index (RoBERTa's family): max_position_embeddings overstates
# their usable length by pad_token_id + 1.
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "data2vec-text"}

log = logging.getLogger("gramfuse")


def position_limit(config: Any) -> int | None:
    """The longest input the model's position embeddings can take, or None where it has none (T5's relative ones)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    if getattr(config, "model_type", "") in OFFSET_POSITIONS:
        limit -= int(getattr(config, "pad_token_id", 1) or 1) + 1
    return limit


def capped_length(max_length: int, config: Any, task: Task) -> int:
    """``max_length``, capped at the model's positions (a seq2seq decoder may be padded one longer: one less)."""
    limit = position_limit(config)
    if limit is None:
        return max_length
    limit -= 1 if task.name == SEQ2SEQ else 0
    if max_length > limit:
        log.warning("--max-length %d exceeds the %d positions the model has: inputs are cut at %d tokens",
                    max_length, limit, limit)
        return limit
    return max_length


def task_fields(task: Task, text_field: str | None = None, label_field: str | None = None,
                pair_field: str = "text_pair") -> Fields:
    """The fields a task reads, with the user's names where given."""
    return Fields(
        text=text_field or task.text_field,
        label=(label_field or task.label_field) if task.label_field else None,
        pair=pair_field if task.name == SEQUENCE_CLASSIFICATION else None,
        words=task.name == TOKEN_CLASSIFICATION,
        target=task.name == SEQ2SEQ,
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
        self.max_length, self.path, self.labelled = capped_length(max_length, config, task), path, labelled

    def _clip(self, text: Any) -> Any:
        """A text cut before tokenising (:data:`CHARS_PER_TOKEN`); a list of words, to ``max_length`` words."""
        if isinstance(text, str):
            return text[: self.max_length * CHARS_PER_TOKEN]
        return text[: self.max_length] if isinstance(text, list) else text

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        encode = {SEQUENCE_CLASSIFICATION: self._sequences, TOKEN_CLASSIFICATION: self._words,
                  CAUSAL_LM: self._texts, SEQ2SEQ: self._sources_and_targets}[self.task.name]
        batch = encode(examples)
        if not self.labelled:
            batch.pop("labels", None)
        return batch

    def _tokenize(self, texts: list, pairs: list | None = None, **options: Any):
        return self.tokenizer([self._clip(text) for text in texts], [self._clip(p) for p in pairs] if pairs else None,
                              padding=True, truncation=True, max_length=self.max_length, return_tensors="pt", **options)

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

    def _sources_and_targets(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Encoder inputs, and decoder inputs built as T5 and BART build them from the labels (the start token, then
        the target shifted right), with the decoder's own attention mask."""
        batch = dict(self._tokenize([e.text for e in examples]))
        if any(e.label is None for e in examples):
            raise DataError(f"{self.path}:{examples[0].line}: a seq2seq model needs every example's target text "
                            "(its decoder reads it)")
        target = self.tokenizer(text_target=[self._clip(e.label) for e in examples], padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        labels, mask = target["input_ids"], target["attention_mask"]
        if labels.shape[1] == batch["input_ids"].shape[1]:
            # One more (masked) pad: the two sides then differ in length, which is how each layer input is matched
            # to its side's mask when the Grams are counted (fusion.gram).
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), self.tokenizer.pad_token_id)], 1)
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], 1)
        start = getattr(self.config, "decoder_start_token_id", None)
        if start is None:
            raise DataError(f"the model's config has no decoder_start_token_id: it cannot be fed {self.path}")
        decoder_inputs = torch.cat([labels.new_full((labels.shape[0], 1), start), labels[:, :-1]], 1)
        batch["decoder_input_ids"] = decoder_inputs
        batch["decoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], 1), mask[:, :-1]], 1)
        batch["labels"] = labels.masked_fill(mask == 0, IGNORED)
        return batch
