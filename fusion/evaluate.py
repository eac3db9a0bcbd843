"""Accuracy and macro-F1 of a classifier on a labelled data file."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch


def probabilities(model: Any, batches: Iterable[Mapping[str, torch.Tensor]], progress: Any = None):
    """Class probabilities (examples x classes) and true labels over batches that carry ``labels``."""
    probs: list[torch.Tensor] = []
    truth: list[int] = []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            probs.append(torch.softmax(model(**inputs).logits, dim=-1))
            truth.extend(batch["labels"].tolist())
            if progress is not None:
                progress.update(len(batch["labels"]))
    return torch.cat(probs), truth


def predict(model: Any, batches: Iterable[Mapping[str, torch.Tensor]], progress: Any = None):
    """Predicted and true labels over batches that carry ``labels``."""
    probs, truth = probabilities(model, batches, progress)
    return probs.argmax(dim=-1).tolist(), truth


def classification_scores(predicted: Sequence[int], truth: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes present in the truth or the predictions.

    Written here rather than taken from scikit-learn: it is a dozen lines, and scikit-learn would be our largest
    dependency for it. Classes neither present nor predicted are left out of the macro mean, as scikit-learn does.
    """
    if not truth:
        raise ValueError("no examples to score")
    correct = sum(p == t for p, t in zip(predicted, truth))
    f1s = []
    for label in range(num_labels):
        true_pos = sum(p == label and t == label for p, t in zip(predicted, truth))
        predicted_pos = sum(p == label for p in predicted)
        actual_pos = sum(t == label for t in truth)
        if predicted_pos == 0 and actual_pos == 0:
            continue
        f1s.append(2 * true_pos / (predicted_pos + actual_pos))
    return {"accuracy": correct / len(truth), "macro_f1": sum(f1s) / len(f1s), "examples": len(truth)}
