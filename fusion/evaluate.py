"""The scores of each task on a labelled data file: accuracy and macro-F1 (classes), Pearson and Spearman (a
regression label), entity-level F1 (token classification), perplexity (causal LM), ROUGE (seq2seq)."""

from __future__ import annotations

import math

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


def _forward(model: Any, batches: Iterable[Mapping[str, torch.Tensor]], progress: Any = None):
    """``(logits, labels)`` of each batch, without gradients."""
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            yield model(**inputs).logits.float(), batch["labels"].to(device)
            if progress is not None:
                progress.update(len(batch["labels"]))


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 1, ties given their mean rank (as Spearman's coefficient needs)."""
    order = torch.argsort(values)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=values.dtype)
    for value in torch.unique(values):
        tied = values == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def regression_scores(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman correlations and mean squared error (GLUE's STS-B reports the first two). Written here:
    scipy would be a large dependency for two formulas."""
    return {"pearson": pearson(predicted, truth), "spearman": pearson(_ranks(predicted.double()), _ranks(truth.double())),
            "mse": float(((predicted.double() - truth.double()) ** 2).mean()), "examples": len(truth)}


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of a tag sequence as ``(type, start, end)``: IOB2 (``B-X`` begins, ``I-X`` continues; an ``I-X``
    after anything but ``X`` begins one, as conlleval reads it); tags without a prefix are single-type spans, ``O``
    is outside."""
    found, current = set(), None
    for position, tag in enumerate(list(tags) + ["O"]):
        prefix, _, kind = tag.partition("-") if "-" in tag else ("", "", tag)
        continues = current is not None and prefix in ("I", "") and kind == current[0] and tag != "O"
        if current is not None and not continues:
            found.add((current[0], current[1], position))
            current = None
        if tag != "O" and not continues:
            current = (kind, position)
    return found


def entity_scores(predicted: Sequence[Sequence[str]], truth: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 over sentences (micro), as ``seqeval``/conlleval count them, and the
    accuracy of word tags. Written here: seqeval would bring scikit-learn for a dozen lines."""
    hits = guessed = actual = words = right = 0
    for guess, gold in zip(predicted, truth):
        guess_entities, gold_entities = entities(guess), entities(gold)
        hits += len(guess_entities & gold_entities)
        guessed, actual = guessed + len(guess_entities), actual + len(gold_entities)
        words, right = words + len(gold), right + sum(g == t for g, t in zip(guess, gold))
    precision = hits / guessed if guessed else 0.0
    recall = hits / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall,
            "tag_accuracy": right / words if words else float("nan"), "examples": len(truth)}


def seq2seq_scores(model: Any, batches: Iterable[Mapping[str, torch.Tensor]], tokenizer: Any,
                   progress: Any = None) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (Google's ``rouge-score``, stemmed) of greedy generations against the targets, and the
    targets' perplexity under the model."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals, total, tokens, examples = dict.fromkeys(kinds, 0.0), 0.0, 0, 0
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            kept = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[kept], labels[kept], reduction="sum"))
            tokens += int(kept.sum())
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=labels.shape[1], do_sample=False)
            references = labels.masked_fill(~kept, tokenizer.pad_token_id)
            for guess, truth in zip(tokenizer.batch_decode(generated, skip_special_tokens=True),
                                    tokenizer.batch_decode(references, skip_special_tokens=True)):
                for kind, value in scorer.score(truth, guess).items():
                    totals[kind] += value.fmeasure
            examples += len(labels)
            if progress is not None:
                progress.update(len(labels))
    if examples == 0:
        raise ValueError("no examples to score")
    return {**{kind: value / examples for kind, value in totals.items()},
            "perplexity": math.exp(total / tokens), "examples": examples}


def scores(task: Any, model: Any, batches: Iterable[Mapping[str, torch.Tensor]], progress: Any = None,
           tokenizer: Any = None) -> dict:
    """The scores of ``task`` (a :class:`fusion.tasks.Task`) for ``model`` over labelled batches (seq2seq also
    needs the ``tokenizer``, to read what the model generates)."""
    from .tasks import CAUSAL_LM, SEQ2SEQ, TOKEN_CLASSIFICATION, is_regression

    config = model.config
    if task.name == SEQ2SEQ:
        return seq2seq_scores(model, batches, tokenizer, progress)
    if task.name == CAUSAL_LM:
        total, tokens, examples = 0.0, 0, 0
        for logits, labels in _forward(model, batches, progress):
            logits, labels = logits[:, :-1], labels[:, 1:]  # each token predicts the next
            kept = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[kept], labels[kept], reduction="sum"))
            tokens, examples = tokens + int(kept.sum()), examples + len(labels)
        if tokens == 0:
            raise ValueError("no tokens to score")
        return {"perplexity": math.exp(total / tokens), "loss": total / tokens, "tokens": tokens, "examples": examples}
    if task.name == TOKEN_CLASSIFICATION:
        names = {int(i): str(label) for i, label in config.id2label.items()}
        predicted, truth = [], []
        for logits, labels in _forward(model, batches, progress):
            guesses = logits.argmax(-1)
            for row in range(len(labels)):
                kept = labels[row] != -100
                predicted.append([names[int(t)] for t in guesses[row][kept]])
                truth.append([names[int(t)] for t in labels[row][kept]])
        return entity_scores(predicted, truth)
    outputs = list(_forward(model, batches, progress))
    if not outputs:
        raise ValueError("no examples to score")
    if is_regression(config):
        return regression_scores(torch.cat([o.reshape(-1) for o, _ in outputs]),
                                 torch.cat([t.reshape(-1) for _, t in outputs]))
    return classification_scores(torch.cat([o.argmax(-1) for o, _ in outputs]).tolist(),
                                 torch.cat([t for _, t in outputs]).tolist(), config.num_labels)
