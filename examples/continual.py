"""Continual merging, measured: owners arrive one at a time; what does each way of merging keep of the early ones?

Five owners of the bundled MiniLM, each fine-tuned on one real sentiment domain (VADER tweets, movie snippets, Amazon
reviews, NYT editorials; Rotten Tomatoes), arrive in that order. After each arrival, three merges of the owners so
far:

- **RegMean, exact sums**: the newcomer added to the sums folder of the merge before (`gramfuse merge --sums S --add
  NEW --save-sums S'`); nobody else is read again, and the result is RegMean over every owner so far.
- **pairwise average (sequential)**: the running merge averaged with the newcomer, as a user holding only the last
  merge would do (mergekit style): after k owners, owner i weighs 2^-(k-i+1) (the first two 2^-(k-1)).
- **running average**: the uniform average of every owner so far (what sums of weights give; no statistics).

Each arrived owner's *retention* (the merge's accuracy on the owner's held-out split over the owner's own model's,
:mod:`fusion.forgetting`) is recorded after every arrival. Results: ``examples/results/continual-default.{json,md,png}``.
``--setting llm``: the LLM comparison's three SmolLM2-135M owners (:mod:`examples.llm`), retention being the owner's
own held-out perplexity over the merge's; ``examples/results/continual-llm.*``.

    python -m examples.continual [--setting domains|llm] [--workdir runs/compare]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from examples.assets import SENTIMENT_DOMAINS, SENTIMENT_LABELS, sentiment
from examples.owners import Owner, prepare_owner, say
from fusion.cli import main as gramfuse
from fusion.merge import merge_folders, merge_from_sums
from fusion.methods import get_method
from fusion.workflows import DataSettings, evaluate_folder

EXACT, PAIRWISE, RUNNING = "regmean, exact sums", "pairwise average (sequential)", "running average"
STRATEGIES = (EXACT, PAIRWISE, RUNNING)
RESULTS = Path(__file__).parent / "results"
MAX_LENGTH = 64


def merges_as_owners_arrive(owners: Sequence[Owner], workdir: Path) -> list[dict[str, Path]]:
    """For each arrival, the model folder of every strategy over the owners so far."""
    regmean, average = get_method("regmean"), get_method("average")
    steps: list[dict[str, Path]] = []
    for k, owner in enumerate(owners, start=1):
        step_dir = workdir / f"after-{k}"
        if step_dir.exists():
            shutil.rmtree(step_dir)
        sums = step_dir / "sums"
        if k == 1:
            merge_folders([owner.model], step_dir / "exact", regmean, save_sums=sums)
            steps.append({EXACT: step_dir / "exact", PAIRWISE: owner.model, RUNNING: owner.model})
            continue
        merge_from_sums(workdir / f"after-{k - 1}" / "sums", step_dir / "exact", regmean, add=[owner.model],
                        save_sums=sums)
        merge_folders([steps[-1][PAIRWISE], owner.model], step_dir / "pairwise", average)
        merge_folders([o.model for o in owners[:k]], step_dir / "running", average)
        steps.append({EXACT: step_dir / "exact", PAIRWISE: step_dir / "pairwise", RUNNING: step_dir / "running"})
        say(f"{k} owners merged three ways")
    return steps


def retention_as_owners_arrive(owners: Sequence[Owner], steps: Sequence[dict[str, Path]],
                               accuracy: Callable[[Path, Path], float]) -> dict:
    """Each arrived owner's retention under every strategy after every arrival, and the owners' own accuracies."""
    own = {o.name: accuracy(o.model, o.test) for o in owners}
    table = []
    for k, merged in enumerate(steps, start=1):
        table.append({strategy: {o.name: accuracy(folder, o.test) / own[o.name] for o in owners[:k]}
                      for strategy, folder in merged.items()})
    return {"owners": [o.name for o in owners], "own_accuracy": own, "retention": table}


def accuracy_of(model: Path, data: Path) -> float:
    return evaluate_folder(model, data, settings=DataSettings(max_length=MAX_LENGTH, batch_size=64),
                           progress=False)["accuracy"]


def inverse_perplexity_of(model: Path, data: Path) -> float:
    """1 / perplexity: higher is better, so that merged / own is the retention of :mod:`fusion.forgetting` (the
    owner's perplexity over the merge's)."""
    from examples.llm import DATA

    return 1.0 / evaluate_folder(model, data, settings=DATA, progress=False)["perplexity"]


def markdown(result: dict) -> str:
    owners = result["owners"]
    lines = ["| owners merged | " + " | ".join(f"{s}: first owner ({owners[0]}) / mean" for s in STRATEGIES) + " |",
             "|---|" + "---|" * len(STRATEGIES)]
    for k, row in enumerate(result["retention"], start=1):
        cells = [f"{row[s][owners[0]]:.3f} / {sum(row[s].values()) / len(row[s]):.3f}" for s in STRATEGIES]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    owners, rows = result["owners"], result["retention"]
    figure, (first, mean) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    arrivals = range(1, len(rows) + 1)
    for strategy in STRATEGIES:
        first.plot(arrivals, [row[strategy][owners[0]] for row in rows], marker="o", label=strategy)
        mean.plot(arrivals, [sum(row[strategy].values()) / len(row[strategy]) for row in rows], marker="o",
                  label=strategy)
    first.set_title(f"the first owner ({owners[0]}) as others arrive")
    mean.set_title("mean over the owners arrived")
    for axes in (first, mean):
        axes.set_xlabel("owners merged")
        axes.set_xticks(list(arrivals))
        axes.axhline(1.0, color="grey", linewidth=0.8)
    first.set_ylabel("retention (merged / own)")
    mean.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def sentiment_owners(workdir: Path) -> tuple[list[Owner], list[str]]:
    labels = tuple(SENTIMENT_LABELS.values())
    owners = [prepare_owner(d, d, sentiment(d), labels, workdir, train=400, test=200, epochs=2)
              for d in SENTIMENT_DOMAINS]
    return owners, ["--max-length", str(MAX_LENGTH)]


def llm_owners(workdir: Path) -> tuple[list[Owner], list[str]]:
    from examples.llm import DATA, SIZES, prepare_owners

    return prepare_owners(workdir, SIZES["default"]), ["--max-length", str(DATA.max_length)]


# setting -> (its owners and their statistics flags, the score whose ratio is retention, the results' name, the
# workdir under the comparison's, where the comparison caches the same owners)
SETTINGS = {"domains": (sentiment_owners, accuracy_of, "continual-default", "domains-default"),
            "llm": (llm_owners, inverse_perplexity_of, "continual-llm", "llm-default")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="domains",
                        help="domains: the five sentiment owners (accuracy); llm: the three SmolLM2 owners "
                        "(retention = the owner's perplexity over the merge's)")
    parser.add_argument("--workdir", default="runs/compare", help="fine-tuned owners are cached here")
    args = parser.parse_args(argv)
    started = time.time()
    owners_of, score, name, cached = SETTINGS[args.setting]
    workdir = Path(args.workdir) / cached if args.setting == "llm" else Path(args.workdir)
    owners, flags = owners_of(workdir)
    for owner in owners:  # each site's statistics, as `gramfuse stats` makes them
        if gramfuse(["stats", str(owner.model), str(owner.train), *flags, "--quiet"]):
            return 1
    steps = merges_as_owners_arrive(owners, workdir / "continual")
    result = retention_as_owners_arrive(owners, steps, score)
    result["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(result))
    chart(result, RESULTS / f"{name}.png")
    print(markdown(result))
    say(f"wrote {RESULTS / name}.md in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
