"""The sentence-pair setting of ``examples.compare``: three owners of MiniLM, each fine-tuned as a similarity
regressor (``num_labels`` 1) on one genre of the GLUE STS Benchmark (image captions, news headlines, forum posts),
merged in one simulated Flower round; Pearson correlation per genre for each owner's own model, every merge, a
model fine-tuned on the pooled pairs and an output ensemble (the mean of the owners' predictions).

    python -m examples.compare --setting stsb
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clients.finetune import FinetuneSettings, finetune_multitask
from examples.assets import STS_GENRES, minilm_dir, sts_benchmark, write_jsonl
from examples.owners import prepare_owner, say
from fusion.checkpoint import load_model, load_tokenizer
from fusion.evaluate import regression_scores
from fusion.workflows import DataSettings, task_batches

METHODS = ["average", "weighted-average", "fisher", "task-arithmetic", "ties", "regmean:alpha=0.5",
           "regmean:alpha=0.9", "regmean"]
DATA = DataSettings(max_length=64, batch_size=64)
SCORE = ("score",)  # one label: a regressor
# A regression head on MiniLM's untrained pooler learns slowly: at the classification settings (2 epochs, 1e-4) the
# owners' own models scored Pearson -0.04 to 0.03 here; 8 epochs at 2e-4 gave 0.78 on captions.
EPOCHS, LEARNING_RATE = 8, 2e-4


def predictions(folder: Path, test: Path) -> tuple[torch.Tensor, torch.Tensor]:
    model, _ = load_model(folder)
    predicted, truth = [], []
    with torch.no_grad():
        for batch in task_batches(model, load_tokenizer(folder), test, DATA, True):
            truth.append(batch.pop("labels"))
            predicted.append(model(**batch).logits.reshape(-1))
    return torch.cat(predicted), torch.cat(truth)


def run(workdir: Path, size) -> dict:
    from examples.compare import federate

    owners = [prepare_owner(genre, genre, sts_benchmark(genre), SCORE, workdir, train=size.train, test=size.test,
                            epochs=size.epochs, learning_rate=LEARNING_RATE) for genre in STS_GENRES]
    pooled = write_jsonl([json.loads(line) for o in owners for line in o.train.read_text().splitlines()],
                         workdir / "data" / "pooled-train.jsonl")
    say("pooled reference: one regressor trained on every genre's pairs (cached after the first run)")
    settings = FinetuneSettings(labels=SCORE, epochs=size.epochs, learning_rate=LEARNING_RATE)
    multitask = finetune_multitask(minilm_dir(), {"pooled": (pooled, settings)}, workdir / "owners")["pooled"]
    candidates = {f"own model ({o.name})": o.model for o in owners}
    candidates["fine-tuned on pooled data"] = multitask
    merged = federate(owners, workdir / "federated-stsb", methods=METHODS)
    candidates.update({label: folders[owners[0].name] for label, folders in merged.items()})
    tests = {o.domain: o.test for o in owners}
    scores, own = {}, {}
    for name, folder in candidates.items():
        scores[name] = {}
        for genre, test in tests.items():
            predicted, truth = predictions(folder, test)
            scores[name][genre] = regression_scores(predicted, truth)
            if name.startswith("own model"):
                own.setdefault(genre, []).append(predicted)
        say(f"evaluated {name}")
    scores["output ensemble (own models)"] = {
        genre: regression_scores(torch.stack(own[genre]).mean(0), predictions(owners[0].model, test)[1])
        for genre, test in tests.items()}
    return {"domains": list(tests), "scores": scores}


def table(result: dict) -> str:
    domains, scores = result["domains"], result["scores"]
    lines = ["| model | " + " | ".join(domains) + " | mean Pearson | mean Spearman |",
             "|---" * (len(domains) + 3) + "|"]
    for name, by_genre in scores.items():
        cells = [f"{by_genre[d]['pearson']:.3f}" for d in domains]
        pearson = sum(by_genre[d]["pearson"] for d in domains) / len(domains)
        spearman = sum(by_genre[d]["spearman"] for d in domains) / len(domains)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pearson:.3f} | {spearman:.3f} |")
    from examples.compare import domain_retention_table

    return "\n".join(lines) + "\n\n" + domain_retention_table(domains, scores)
