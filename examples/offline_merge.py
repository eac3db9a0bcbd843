"""The offline "measure, then merge" job on the bundled real model and data.

Two data owners each fine-tune all-MiniLM-L6-v2 on one VADER sentiment domain (Amazon reviews, movie snippets),
compute their statistics, and the models are merged offline with every method; each merged model is evaluated on
both owners' held-out test splits next to the owners' own models.

    python -m examples.offline_merge [--train 400] [--test 300] [--domains amazon movies] [--workdir runs/offline]

Writes WORKDIR/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from clients.finetune import FinetuneSettings, finetune
from examples.assets import SENTIMENT_LABELS, VADER_DOMAINS, minilm_dir, split, vader, write_jsonl
from fusion.methods import get_method
from fusion.merge import merge_folders
from fusion.workflows import DataSettings, compute_statistics, evaluate_folder

METHODS = [
    ("average", {}),
    ("weighted-average", {}),
    ("fisher", {}),
    ("task-arithmetic", {}),
    ("ties", {}),
    ("regmean", {"alpha": 1.0}),
    ("regmean", {"alpha": 0.9}),
]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare(domains: list[str], workdir: Path, train: int, test: int, seed: int) -> dict[str, dict[str, Path]]:
    files = {}
    for domain in domains:
        rows = vader(domain)
        train_rows, test_rows = split(rows, seed, train, test)
        files[domain] = {
            "train": write_jsonl(train_rows, workdir / "data" / f"{domain}-train.jsonl"),
            "test": write_jsonl(test_rows, workdir / "data" / f"{domain}-test.jsonl"),
        }
        say(f"data {domain}: {len(rows)} labelled snippets, {len(train_rows)} train, {len(test_rows)} test")
    return files


def label(method: str, options: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in options.items())


def run(domains: list[str], workdir: Path, train: int, test: int, epochs: int, seed: int) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    files = prepare(domains, workdir, train, test, seed)
    base = minilm_dir()
    settings = FinetuneSettings(labels=tuple(SENTIMENT_LABELS.values()), epochs=epochs, seed=seed)
    owners = {}
    for domain in domains:
        say(f"owner {domain}: fine-tuning (cached after the first run)")
        owners[domain] = finetune(base, files[domain]["train"], workdir / "owners" / domain, settings)
        say(f"owner {domain}: statistics and Fisher over its training data")
        compute_statistics(owners[domain], files[domain]["train"], settings=DataSettings(max_length=64), fisher=True)

    candidates = {f"own model ({domain})": owners[domain] for domain in domains}
    for method, options in METHODS:
        name = label(method, options)
        say(f"merge: {name}")
        out = workdir / "merged" / name.replace(" ", "_").replace("=", "")
        merge_folders(list(owners.values()), out, get_method(method, **options), base_dir=base, overwrite=True)
        candidates[name] = out

    results = {"domains": domains, "train": train, "test": test, "epochs": epochs, "seed": seed, "scores": {}}
    for name, folder in candidates.items():
        scores = {d: evaluate_folder(folder, files[d]["test"], settings=DataSettings(max_length=64), progress=False)
                  for d in domains}
        results["scores"][name] = scores
        say(f"evaluated {name}: " + ", ".join(f"{d} {s['accuracy']:.3f}" for d, s in scores.items()))
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    domains = results["domains"]
    lines = ["| model | " + " | ".join(domains) + " | mean |", "|---" * (len(domains) + 2) + "|"]
    for name, scores in results["scores"].items():
        accuracies = [scores[d]["accuracy"] for d in domains]
        cells = " | ".join(f"{a:.3f}" for a in accuracies)
        lines.append(f"| {name} | {cells} | {sum(accuracies) / len(accuracies):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.offline_merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", nargs="+", default=["amazon", "movies"], choices=sorted(VADER_DOMAINS))
    parser.add_argument("--train", type=int, default=400, help="training examples per owner (default 400)")
    parser.add_argument("--test", type=int, default=300, help="test examples per owner (default 300)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("runs/offline"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="gramfuse: %(levelname)s: %(message)s")
    results = run(args.domains, args.workdir, args.train, args.test, args.epochs, args.seed)
    print("\nAccuracy on each owner's held-out test split:\n")
    print(table(results))
    print(f"\n{args.workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
