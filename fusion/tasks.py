"""Task types: what a checkpoint was fine-tuned for, read from its ``config.architectures``, and what follows from it
(the ``AutoModelFor...`` class that loads it, the fields of its data, how a batch is labelled and scored).

Architectures are data, as in mergekit: a task is recognised by the suffix of the architecture's class name, so a new
model family of a supported task needs no code here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from .errors import GramfuseError


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # the transformers Auto class that loads and rebuilds the model
    suffixes: tuple[str, ...]  # architecture class names ending so are this task
    text_field: str  # default data fields
    label_field: str | None  # None: the text is its own target (causal LM)
    summary: str  # for --help and errors

    def auto(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)


SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"
CAUSAL_LM = "causal-lm"
SEQ2SEQ = "seq2seq"

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(SEQUENCE_CLASSIFICATION, "AutoModelForSequenceClassification", ("ForSequenceClassification",),
             "text", "label", "single texts or pairs (text, text_pair) with a class, or a score when num_labels is 1"),
        Task(TOKEN_CLASSIFICATION, "AutoModelForTokenClassification", ("ForTokenClassification",),
             "tokens", "tags", "words (tokens) with one tag per word; the tag goes on each word's first sub-token"),
        Task(CAUSAL_LM, "AutoModelForCausalLM", ("ForCausalLM", "LMHeadModel"), "text", None,
             "text only; every real token counts"),
        Task(SEQ2SEQ, "AutoModelForSeq2SeqLM", ("ForConditionalGeneration",), "source", "target",
             "a source text and its target text; encoder and decoder Grams over each side's real tokens"),
    )
}


def supported() -> str:
    return ", ".join(f"{name} (*{'/*'.join(task.suffixes)})" for name, task in TASKS.items())


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise GramfuseError(f"unknown task {name!r}; supported: {', '.join(TASKS)}") from None


def task_of(config: Any, override: str | None = None) -> Task:
    """The task of a model config: ``override`` (``--task``) if given, else its first architecture's suffix."""
    if override:
        return get_task(override)
    architectures: Sequence[str] = getattr(config, "architectures", None) or []
    if not architectures:
        raise GramfuseError(
            f"the config names no architecture (config.architectures is empty), so its task is unknown; give --task "
            f"({', '.join(TASKS)})"
        )
    architecture = architectures[0]
    for task in TASKS.values():
        if architecture.endswith(task.suffixes):
            return task
    raise GramfuseError(f"architecture {architecture!r} is not supported; supported tasks: {supported()}")


def model_task(model: Any) -> Task:
    """The task of a loaded model, by its class (what it was loaded as, whatever its config says)."""
    return task_of(SimpleNamespace(architectures=[type(model).__name__]))


def is_regression(config: Any) -> bool:
    return getattr(config, "problem_type", None) == "regression" or int(getattr(config, "num_labels", 2)) == 1


def example_log_likelihood(task: Task, config: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(y | x)`` of one example (a batch of one), summed over its labelled tokens: what the Fisher squares the
    gradient of. Regression: the log density of a unit-variance Gaussian, up to a constant."""
    if task.name == SEQUENCE_CLASSIFICATION:
        if is_regression(config):
            return -0.5 * (logits.reshape(-1)[0] - labels.reshape(-1)[0].to(logits.dtype)) ** 2
        return torch.log_softmax(logits, dim=-1)[0, labels[0]]
    if task.name == CAUSAL_LM:  # each token predicts the next
        logits, labels = logits[:, :-1], labels[:, 1:]
    kept = labels != -100
    return torch.log_softmax(logits[kept], dim=-1).gather(1, labels[kept].unsqueeze(1)).sum()
