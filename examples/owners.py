"""Data owners for the examples: each fine-tunes the bundled MiniLM on one real VADER domain, as a site would.

Owner ``i`` takes domain ``domains[i % len(domains)]``; a second owner of the same domain gets another seeded
training split and fine-tuning seed. Fine-tuned models are cached in the work folder (reruns skip the work).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from clients.finetune import FinetuneSettings, finetune
from examples.assets import SENTIMENT_LABELS, minilm_dir, split, vader, write_jsonl


@dataclass(frozen=True)
class Owner:
    name: str
    domain: str
    model: Path
    train: Path
    test: Path


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_owners(domains: list[str], count: int, workdir: Path, *, train: int, test: int, epochs: int,
                   seed: int = 0) -> list[Owner]:
    owners = []
    rows = {domain: vader(domain) for domain in domains}
    for index in range(count):
        domain = domains[index % len(domains)]
        copy = index // len(domains)
        name = domain if copy == 0 else f"{domain}-{copy}"
        # The test split is the same for every owner of a domain; training rows come from the rest, by copy.
        pool, test_rows = split(rows[domain], seed, len(rows[domain]) - test, test)
        train_rows = pool[copy * train : (copy + 1) * train] or pool[:train]
        train_file = write_jsonl(train_rows, workdir / "data" / f"{name}-train.jsonl")
        test_file = write_jsonl(test_rows, workdir / "data" / f"{domain}-test.jsonl")
        settings = FinetuneSettings(labels=tuple(SENTIMENT_LABELS.values()), epochs=epochs, seed=seed + copy)
        say(f"owner {name}: {len(train_rows)} training snippets; fine-tuning (cached after the first run)")
        model = finetune(minilm_dir(), train_file, workdir / "owners" / name, settings)
        owners.append(Owner(name, domain, model, train_file, test_file))
    return owners
