"""RegMean++ against RegMean, offline, on the comparison's own owners (issue 14): the same fine-tuned models, the same
training data for the statistics, the same alphas, the same test splits.

RegMean's statistics are computed once per owner (``gramfuse stats``) and serve every alpha; RegMean++ runs every
owner's data through the merge as it is built, once per alpha (the merged prefix depends on it). Each difference is
given with its paired bootstrap standard error over the test examples (the same examples score both merges), so that
a gain can be told from noise; the issue's bar for a federated RegMean++ is 0.02 accuracy (or Pearson) beyond the
noise, or 5% perplexity.

    python -m examples.plusplus [--setting domains|tasks|stsb|llm] [--full] [--alpha 0.5 1.0] [--workdir runs/compare]

Owners come from ``examples.compare``'s work folders (fine-tuned there, or here on first use, and cached). Writes
WORKDIR/plusplus-<setting>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from examples.owners import Owner, say
from fusion.finish import MERGED
from fusion.merge import merge_folders
from fusion.methods import get_method
from fusion.workflows import DataSettings, compute_statistics, evaluate_folder

BOOTSTRAP = 1000
HELD_OUT = "nyt"  # the domain compare's default run leaves out of the federation, scored out of domain
# A paired score: per example, what the metric needs (correctness; or prediction and truth for Pearson).
Scorer = Callable[[Path, Path], torch.Tensor]


@dataclass
class Setting:
    owners: list[Owner]
    tests: dict[str, Path]  # split -> test file; a split whose name is an owner's is that owner's own
    data: DataSettings
    metric: str  # "accuracy", "pearson" or "perplexity"
    scorer: Scorer | None  # per-example scores, for the bootstrap (None: perplexity, compared by its relative change)
    shared_labels: bool

    @property
    def in_domain(self) -> list[str]:
        return [owner.domain for owner in self.owners]


def correctness(folder: Path, test: Path) -> torch.Tensor:
    from examples.compare import probabilities

    probs, truth = probabilities(folder, test)
    return (probs.argmax(-1) == torch.tensor(truth)).double()


def prediction_pairs(folder: Path, test: Path) -> torch.Tensor:
    from examples.stsb import predictions

    predicted, truth = predictions(folder, test)
    return torch.stack([predicted.double(), truth.double()], dim=1)


def metric_of(metric: str, rows: torch.Tensor) -> torch.Tensor:
    """The metric over examples (rows), batched over leading bootstrap dimensions."""
    if metric == "accuracy":
        return rows.mean(-1)
    centred = rows - rows.mean(-2, keepdim=True)
    product = (centred[..., 0] * centred[..., 1]).sum(-1)
    return product / (centred[..., 0].norm(dim=-1) * centred[..., 1].norm(dim=-1))


def paired_difference(metric: str, ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """Metric(ours) - metric(theirs) on one test split and its paired bootstrap standard error."""
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, ours.shape[0], (BOOTSTRAP, ours.shape[0]), generator=generator)
    resampled = metric_of(metric, ours[picks]) - metric_of(metric, theirs[picks])
    return {"difference": float(metric_of(metric, ours) - metric_of(metric, theirs)),
            "standard_error": float(resampled.std())}


def setting_of(name: str, workdir: Path, full: bool = False) -> Setting:
    """The owners and test splits ``examples.compare`` uses for ``name`` (its ``--full`` sizes with ``full``),
    prepared or taken from its cache."""
    from examples import compare, llm, stsb
    from examples.assets import SENTIMENT_DOMAINS, SENTIMENT_LABELS, TASKS, sentiment, sts_benchmark
    from examples.assets import STS_GENRES
    from examples.owners import prepare_owner

    label = "full" if full else "default"
    if name == "llm":
        size = llm.SIZES[label]
        owners = llm.prepare_owners(workdir / f"llm-{label}", size)
        return Setting(owners, {o.domain: o.test for o in owners}, llm.DATA, "perplexity", None, True)
    size = compare.SIZES[label]
    classes = DataSettings(max_length=compare.MAX_LENGTH, batch_size=64)
    if name == "domains":
        folder, labels = workdir / f"domains-{label}", tuple(SENTIMENT_LABELS.values())
        domains = [d for d in SENTIMENT_DOMAINS if d != HELD_OUT] + [HELD_OUT]  # in compare's order
        owners = [prepare_owner(d, d, sentiment(d), labels, folder, train=size.train, test=size.test,
                                epochs=size.epochs) for d in domains]
        return Setting(owners[:-1], {o.domain: o.test for o in owners}, classes, "accuracy", correctness, True)
    if name == "tasks":
        owners = [prepare_owner(task, task, load(), labels, workdir / f"tasks-{label}", train=size.train,
                                test=size.test, epochs=size.epochs) for task, (load, labels) in TASKS.items()]
        return Setting(owners, {o.domain: o.test for o in owners}, classes, "accuracy", correctness, False)
    owners = [prepare_owner(genre, genre, sts_benchmark(genre), stsb.SCORE, workdir / f"stsb-{label}",
                            train=size.train, test=size.test, epochs=stsb.EPOCHS, learning_rate=stsb.LEARNING_RATE)
              for genre in STS_GENRES]
    return Setting(owners, {o.domain: o.test for o in owners}, stsb.DATA, "pearson", prediction_pairs, True)


def serving(out: Path, report: dict, owner: str) -> Path:
    """The folder of a merge that serves ``owner`` (its own head's where label sets differ)."""
    return out / next(folder for folder, served in report["outputs"].items() if owner in served)


def candidate_folders(setting: Setting, out: Path, report: dict) -> dict[str, Path]:
    """Split -> the merged folder scored on it."""
    if setting.shared_labels:
        return {split: out / MERGED for split in setting.tests}
    return {owner.domain: serving(out, report, owner.name) for owner in setting.owners}


def merges(setting: Setting, alphas: list[float], out: Path) -> dict[str, dict]:
    """Every merge, timed: RegMean from statistics files (their computation counted once, in each RegMean's time),
    RegMean++ from the owners' data."""
    started = time.perf_counter()
    for owner in setting.owners:
        compute_statistics(owner.model, owner.train, settings=setting.data, progress=False)
    statistics_seconds = time.perf_counter() - started
    say(f"statistics of {len(setting.owners)} owners: {statistics_seconds:.0f} s")
    models = [o.model for o in setting.owners]
    data = [o.train for o in setting.owners]
    done = {}
    for alpha in alphas:
        for name in ("regmean", "regmean++"):
            label = f"{name}:alpha={alpha:g}"
            folder = out / label.replace(":", "-")
            started = time.perf_counter()
            extra = {"data": data, "data_settings": setting.data} if name == "regmean++" else {}
            report = merge_folders(models, folder, get_method(name, alpha=alpha), overwrite=True, **extra)
            seconds = time.perf_counter() - started + (statistics_seconds if name == "regmean" else 0.0)
            done[label] = {"folder": folder, "report": report, "seconds": round(seconds, 1)}
            say(f"{label}: {seconds:.0f} s")
    return done


def evaluate(setting: Setting, done: dict[str, dict]) -> dict[str, dict]:
    results = {}
    for label, merge in done.items():
        folders = candidate_folders(setting, merge["folder"], merge["report"])
        scores, rows = {}, {}
        for split, folder in folders.items():
            test = setting.tests[split]
            if setting.scorer is None:
                scores[split] = evaluate_folder(folder, test, settings=setting.data, progress=False)["perplexity"]
            else:
                rows[split] = setting.scorer(folder, test)
                scores[split] = float(metric_of(setting.metric, rows[split]))
        results[label] = {"scores": scores, "rows": rows, "seconds": merge["seconds"]}
        say(f"evaluated {label}")
    return results


def verdicts(setting: Setting, results: dict[str, dict], alphas: list[float]) -> dict[str, dict]:
    """Per alpha and split: RegMean++ minus RegMean, with its paired standard error (or relative change)."""
    out = {}
    for alpha in alphas:
        ours, theirs = results[f"regmean++:alpha={alpha:g}"], results[f"regmean:alpha={alpha:g}"]
        per_split = {}
        for split in ours["scores"]:
            if setting.scorer is None:
                relative = ours["scores"][split] / theirs["scores"][split] - 1.0
                per_split[split] = {"relative_change": relative}
            else:
                per_split[split] = paired_difference(setting.metric, ours["rows"][split], theirs["rows"][split])
        entry = {"splits": per_split, "time_ratio": ours["seconds"] / theirs["seconds"]}
        if setting.scorer is not None:  # the mean over the owners' own splits; splits are independent samples
            inside = [per_split[split] for split in setting.in_domain]
            entry["mean_in_domain"] = {
                "difference": sum(c["difference"] for c in inside) / len(inside),
                "standard_error": sum(c["standard_error"] ** 2 for c in inside) ** 0.5 / len(inside)}
        out[f"alpha={alpha:g}"] = entry
    return out


def table(setting: Setting, results: dict[str, dict], compared: dict[str, dict]) -> str:
    splits = list(next(iter(results.values()))["scores"])
    lines = [f"| merge | {' | '.join(splits)} | mean | seconds |", "|---" * (len(splits) + 3) + "|"]
    for label, result in results.items():
        values = [result["scores"][s] for s in splits]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {sum(values) / len(values):.3f} | {result['seconds']:.0f} |")
    lines += ["", f"RegMean++ minus RegMean ({setting.metric}; ± paired bootstrap standard error):", ""]
    for alpha, entry in compared.items():
        cells = []
        for split, change in entry["splits"].items():
            if "relative_change" in change:
                cells.append(f"{split} {100 * change['relative_change']:+.1f}%")
            else:
                cells.append(f"{split} {change['difference']:+.3f} ± {change['standard_error']:.3f}")
        if "mean_in_domain" in entry:
            mean = entry["mean_in_domain"]
            cells.append(f"**mean in domain {mean['difference']:+.3f} ± {mean['standard_error']:.3f}**")
        lines.append(f"- {alpha}: " + ", ".join(cells) + f"; time {entry['time_ratio']:.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.plusplus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("domains", "tasks", "stsb", "llm"), default="domains")
    parser.add_argument("--full", action="store_true", help="compare's larger splits (1000 training and 500 test "
                        "examples per owner; fine-tuned on first use)")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/compare"))
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    setting = setting_of(args.setting, workdir, args.full)
    name = f"plusplus-{args.setting}-{'full' if args.full else 'default'}"
    done = merges(setting, args.alpha, workdir / name)
    results = evaluate(setting, done)
    compared = verdicts(setting, results, args.alpha)
    text = table(setting, results, compared)
    record = {"setting": args.setting, "size": "full" if args.full else "default", "metric": setting.metric, "owners": [o.name for o in setting.owners],
              "tests": {s: str(p) for s, p in setting.tests.items()},
              "results": {label: {k: v for k, v in r.items() if k != "rows"} for label, r in results.items()},
              "regmean++_minus_regmean": compared}
    (workdir / f"{name}.json").write_text(json.dumps(record, indent=2))
    (workdir / f"{name}.md").write_text(text + "\n")
    print(f"\nRegMean++ and RegMean, {args.setting}:\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
