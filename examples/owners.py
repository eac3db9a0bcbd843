"""Data owners for the examples: each fine-tunes the bundled MiniLM on its own real data, as a site would.

Fine-tuned models are cached in the work folder (reruns skip the work). Splits are seeded and disjoint; every owner
of a domain or task shares that domain's test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clients.finetune import FinetuneSettings, finetune
from examples.assets import SENTIMENT_LABELS, minilm_dir, sentiment, split, write_jsonl


@dataclass(frozen=True)
class Owner:
    name: str
    domain: str  # the domain or task whose data it holds
    labels: tuple[str, ...]
    model: Path
    train: Path
    test: Path


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def split_files(domain: str, rows: list[dict], workdir: Path, *, train: int, test: int, copy: int = 0,
                seed: int = 0) -> tuple[Path, Path]:
    """Training rows of one owner (``copy`` picks a disjoint slice) and the domain's shared test split."""
    pool, test_rows = split(rows, seed, len(rows) - test, test)
    train_rows = pool[copy * train : (copy + 1) * train] or pool[:train]
    name = domain if copy == 0 else f"{domain}-{copy}"
    return (write_jsonl(train_rows, workdir / "data" / f"{name}-train.jsonl"),
            write_jsonl(test_rows, workdir / "data" / f"{domain}-test.jsonl"))


def prepare_owner(name: str, domain: str, rows: list[dict], labels: tuple[str, ...], workdir: Path, *, train: int,
                  test: int, epochs: int, copy: int = 0, seed: int = 0, learning_rate: float = 1e-4) -> Owner:
    train_file, test_file = split_files(domain, rows, workdir, train=train, test=test, copy=copy, seed=seed)
    settings = FinetuneSettings(labels=labels, epochs=epochs, learning_rate=learning_rate, seed=seed + copy)
    say(f"owner {name}: {train} training examples of {domain}; fine-tuning (cached after the first run)")
    model = finetune(minilm_dir(), train_file, workdir / "owners" / name, settings)
    return Owner(name, domain, labels, model, train_file, test_file)


def prepare_owners(domains: list[str], count: int, workdir: Path, *, train: int, test: int, epochs: int,
                   seed: int = 0, load: Callable[[str], list[dict]] = sentiment) -> list[Owner]:
    """``count`` sentiment owners: owner ``i`` holds domain ``domains[i % len(domains)]``; a second owner of the same
    domain gets another disjoint training slice and fine-tuning seed."""
    rows = {domain: load(domain) for domain in domains}
    owners = []
    for index in range(count):
        domain = domains[index % len(domains)]
        copy = index // len(domains)
        name = domain if copy == 0 else f"{domain}-{copy}"
        owners.append(prepare_owner(name, domain, rows[domain], tuple(SENTIMENT_LABELS.values()), workdir,
                                    train=train, test=test, epochs=epochs, copy=copy, seed=seed))
    return owners
