"""The diagonal empirical Fisher of a model, gathered at the data site with the statistics.

``F = sum over examples of (d log p(y | x) / d theta)^2`` with the example's true label ``y`` (its tags, for token
classification; its own next tokens, for a causal LM: the log-likelihood summed over the example's labelled tokens).
Per-example gradients are needed (the square of a batch gradient is not the Fisher), so examples go through one at a
time; the sum, not the mean, is kept, as for the Grams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


def class_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1)[0, labels[0]]


def collect_fisher(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], progress: Any = None,
    log_likelihood: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = class_log_likelihood,
) -> tuple[dict[str, torch.Tensor], int]:
    """Squared-score sums per trainable parameter and the number of examples; batches must carry ``labels``.
    ``log_likelihood(logits, labels)`` of a batch of one example (:func:`fusion.tasks.example_log_likelihood`)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it will be used
    count = 0
    try:
        for batch in batches:
            device = next(iter(params.values())).device
            labels = batch["labels"].to(device)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            for row in range(labels.shape[0]):
                single = {k: v[row : row + 1] for k, v in inputs.items()}
                label = labels[row : row + 1]
                if "attention_mask" in single:  # drop this example's padding: it would change nothing but cost
                    full, length = single["attention_mask"].shape[1], int(single["attention_mask"].sum())
                    # only the tensors of the input's length: a seq2seq decoder's are of another
                    single = {k: v[:, :length] if v.dim() == 2 and v.shape[1] == full else v for k, v in single.items()}
                    if label.dim() == 2 and label.shape[1] == full:
                        label = label[:, :length]
                model.zero_grad(set_to_none=True)
                logits = model(**single).logits
                log_likelihood(logits, label).backward()
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name] += p.grad.detach().to(torch.float64).square()
                count += 1
            if progress is not None:
                progress.update(labels.shape[0])
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: value.to(torch.float32).cpu() for name, value in fisher.items()}, count
