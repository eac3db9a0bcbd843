"""Each task's scores against independent formulas, and the Fisher of a causal LM against transformers' own loss."""

from __future__ import annotations

import json
import random
from functools import partial

import numpy as np
import pytest
import torch
from helpers import WORDS, tiny_causal_lm, tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.data import read_examples
from fusion.encode import Encoder, task_fields
from fusion.evaluate import entities, entity_scores, regression_scores, scores
from fusion.fisher import collect_fisher
from fusion.tasks import CAUSAL_LM, TASKS, example_log_likelihood


def test_entities_are_read_as_conlleval_reads_iob2():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entities(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    assert entities(["I-ORG", "I-ORG", "B-ORG"]) == {("ORG", 0, 2), ("ORG", 2, 3)}  # a stray I- begins one
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}
    assert entities(["O", "O"]) == set()


def test_entity_scores_by_hand():
    truth = [["B-X", "I-X", "O", "B-Y"], ["B-Y", "O"]]
    guess = [["B-X", "I-X", "O", "O"], ["B-Y", "B-X"]]
    result = entity_scores(guess, truth)
    # entities: truth X(0,2) Y(3,4) Y(0,1) ; guess X(0,2) Y(0,1) X(1,2): 2 hits of 3 guessed and 3 actual
    assert result["entity_precision"] == pytest.approx(2 / 3)
    assert result["entity_recall"] == pytest.approx(2 / 3)
    assert result["entity_f1"] == pytest.approx(2 / 3)
    assert result["tag_accuracy"] == pytest.approx(4 / 6)


@settings(deadline=None, max_examples=30)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(-3, 3)), min_size=3, max_size=30))
def test_pearson_and_spearman_match_numpy(pairs):
    truth = torch.tensor([float(t) for t, _ in pairs], dtype=torch.float64)  # integer scores: many ties
    predicted = torch.tensor([p for _, p in pairs], dtype=torch.float64)
    if truth.std() == 0 or predicted.std() == 0:
        return
    result = regression_scores(predicted, truth)
    assert result["pearson"] == pytest.approx(np.corrcoef(predicted.numpy(), truth.numpy())[0, 1], abs=1e-9)

    def mean_ranks(values):  # an independent tie-averaged ranking
        values = values.numpy()
        return np.array([np.sum(values < v) + (np.sum(values == v) + 1) / 2 for v in values])

    expected = np.corrcoef(mean_ranks(predicted), mean_ranks(truth))[0, 1]
    assert result["spearman"] == pytest.approx(expected, abs=1e-9)


def lm_batch(tmp_path, count=6, seed=0):
    rng = random.Random(seed)
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))})
                            + "\n" for _ in range(count)))
    model = tiny_causal_lm(layers=1)
    task = TASKS[CAUSAL_LM]
    return model, Encoder(task, tokenizer(), model.config, max_length=32, path=path)(
        list(read_examples(path, task_fields(task))))


def test_perplexity_is_the_exponential_of_transformers_loss_over_real_tokens(tmp_path):
    model, batch = lm_batch(tmp_path)
    assert (batch["attention_mask"] == 0).any()  # pads present, and they must not count
    result = scores(TASKS[CAUSAL_LM], model, [batch])
    with torch.no_grad():
        loss = float(model(**batch).loss)  # transformers' mean over the shifted labels that are not -100
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(loss), rel=1e-5)
    assert result["tokens"] == int(batch["attention_mask"][:, 1:].sum())


def test_causal_lm_fisher_is_the_squared_gradient_of_each_examples_log_likelihood(tmp_path):
    model, batch = lm_batch(tmp_path, count=3)
    task = TASKS[CAUSAL_LM]
    fisher, count = collect_fisher(model, [batch], log_likelihood=partial(example_log_likelihood, task, model.config))
    assert count == 3
    expected = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()}
    for row in range(3):
        single = {k: v[row : row + 1] for k, v in batch.items()}
        model.zero_grad()
        output = model(**single)
        tokens = int((single["labels"][:, 1:] != -100).sum())
        (output.loss * tokens).backward()  # -log-likelihood summed over the example's predicted tokens
        for name, p in model.named_parameters():
            expected[name] += p.grad.double() ** 2
    for name, value in expected.items():
        torch.testing.assert_close(fisher[name].double(), value, rtol=1e-4, atol=1e-10)
