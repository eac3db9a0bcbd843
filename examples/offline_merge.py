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
from pathlib import Path

from examples.assets import VADER_DOMAINS, minilm_dir
from examples.owners import prepare_owners, say
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


def label(method: str, options: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in options.items())


def run(domains: list[str], workdir: Path, train: int, test: int, epochs: int, seed: int) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    owners = prepare_owners(domains, len(domains), workdir, train=train, test=test, epochs=epochs, seed=seed)
    for owner in owners:
        say(f"owner {owner.name}: statistics and Fisher over its training data")
        compute_statistics(owner.model, owner.train, settings=DataSettings(max_length=64), fisher=True)

    candidates = {f"own model ({owner.name})": owner.model for owner in owners}
    for method, options in METHODS:
        name = label(method, options)
        say(f"merge: {name}")
        out = workdir / "merged" / name.replace(" ", "_").replace("=", "")
        merge_folders([o.model for o in owners], out, get_method(method, **options), base_dir=minilm_dir(),
                      overwrite=True)
        candidates[name] = out

    results = {"domains": domains, "train": train, "test": test, "epochs": epochs, "seed": seed, "scores": {}}
    tests = {owner.domain: owner.test for owner in owners}
    for name, folder in candidates.items():
        scores = {d: evaluate_folder(folder, tests[d], settings=DataSettings(max_length=64), progress=False)
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
