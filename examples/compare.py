"""The RegMean paper's comparison on bundled real data, through a simulated Flower federation.

**domains** (the default): owners each hold one sentiment domain (VADER tweets, movie snippets, Amazon reviews, NYT
editorials, Rotten Tomatoes critics), one label set. One domain is left out of the federation and used out of
domain; the default run leaves out ``nyt``, ``--full`` rotates through all five with larger splits.
**tasks**: four owners with different tasks and label sets (sentiment, TREC-6, SMS spam, BBC topics), each keeping
its own head on the merged body.
**llm**: three owners of the causal LM SmolLM2-135M-Instruct, each fine-tuned on one real text domain; held-out
perplexity (:mod:`examples.llm`).
**stsb**: three owners of MiniLM fine-tuned as similarity regressors on one STS-B genre each; Pearson correlation
(:mod:`examples.stsb`).

Every merge comes from one federated round (each site computes its statistics and Fisher locally; the server merges
with every method from the same sums). Next to the merges: each owner's own model, an output ensemble (domains),
and a multi-task model trained on the pooled data (the upper bound merging tries to reach without the data).

    python -m examples.compare [--setting domains|tasks|llm|stsb] [--full] [--workdir runs/compare]

Writes WORKDIR/results.json, WORKDIR/results.md and WORKDIR/results.png, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace
from pathlib import Path

import torch

from clients.finetune import FinetuneSettings, finetune_multitask
from examples.assets import SENTIMENT_DOMAINS, SENTIMENT_LABELS, TASKS, minilm_dir, sentiment, write_jsonl
from examples.owners import Owner, prepare_owner, say
from fusion.checkpoint import load_model, load_tokenizer
from fusion.workflows import DataSettings, task_batches
from fusion.evaluate import classification_scores
from fusion.evaluate import probabilities as class_probabilities
from fusion.forgetting import retention
from server.processes import Loopback

METHODS = ["average", "weighted-average", "fisher", "task-arithmetic", "ties",
           "regmean:alpha=0.1", "regmean:alpha=0.5", "regmean:alpha=0.9", "regmean",
           "regmean:lines_alpha=0.5;lines_beta=0.5"]
MAX_LENGTH = 64


@dataclass(frozen=True)
class Size:
    train: int
    test: int
    epochs: int


SIZES = {"default": Size(train=400, test=200, epochs=2), "full": Size(train=1000, test=500, epochs=2)}


def probabilities(model_dir: Path, data_file: Path) -> tuple[torch.Tensor, list[int]]:
    """Class probabilities of a model folder on a labelled file, and the true labels."""
    model, _ = load_model(model_dir)
    settings = DataSettings(max_length=MAX_LENGTH, batch_size=64)
    return class_probabilities(model, task_batches(model, load_tokenizer(model_dir), data_file, settings, True))


def scores_of(probs: torch.Tensor, truth: list[int]) -> dict:
    return classification_scores(probs.argmax(-1).tolist(), truth, probs.shape[1])


def federate(owners: list[Owner], workdir: Path, timeout: int = 3600, methods: list[str] = METHODS,
             base: Path | None = None, what: str = "statistics and Fisher",
             extra: str = "") -> dict[str, dict[str, Path]]:
    """One simulated federated round over the owners; returns, per method, each owner's merged model folder."""
    workspace = workdir / "workspace"
    shutil.rmtree(workspace, ignore_errors=True)
    for owner in owners:
        (workspace / owner.name).mkdir(parents=True)
        (workspace / owner.name / "model").symlink_to(owner.model.resolve())
        (workspace / owner.name / "data.jsonl").symlink_to(owner.train.resolve())
    out = workdir / "federated"
    simulation = Loopback(workdir / "flower", simulation=True)
    say(f"federated round: {len(owners)} simulated sites compute {what}; the server merges with "
        f"{len(methods)} methods")
    try:
        simulation.start_superlink()
        done = simulation.run(f"workspace='{workspace}' out-dir='{out}' method='{','.join(methods)}' "
                              f"base-path='{base or minilm_dir()}' min-owners={len(owners)} timeout={timeout} {extra}",
                              num_supernodes=len(owners), timeout=timeout + 300, capture=False)
    finally:
        simulation.stop()
    if done.returncode != 0 or not (out / "report.json").is_file():
        raise SystemExit(f"the federated round failed; see the logs in {simulation.root}")
    report = json.loads((out / "report.json").read_text())
    site_of = {o["name"]: o["site"] for o in next(iter(report["methods"].values()))["owners"]}
    folders = {}
    for label, method_report in report["methods"].items():  # "outputs": each folder and the owners it serves
        folders[label] = {site_of[name]: out / label / folder for folder, served in method_report["outputs"].items()
                          for name in served}
    return folders


def evaluate_all(candidates: dict[str, dict[str, Path]], owners: list[Owner], tests: dict[str, Path],
                 shared_labels: bool) -> dict[str, dict[str, dict]]:
    """Scores of every candidate on every test split it can answer; ``candidates[name][owner]`` is the folder that
    serves that owner. With one label set a candidate is one model, scored on every split, and the output ensemble
    averages the owners' own models' probabilities; otherwise each owner's folder is scored on its own task."""
    results: dict[str, dict[str, dict]] = {}
    own_probs: dict[str, list[torch.Tensor]] = {}
    truth: dict[str, list[int]] = {}
    for name, per_owner in candidates.items():
        if shared_labels:
            jobs = [(split, per_owner[owners[0].name], test) for split, test in tests.items()]
        else:
            jobs = [(owner.domain, per_owner[owner.name], tests[owner.domain]) for owner in owners]
        results[name] = {}
        for split, folder, test_file in jobs:
            probs, truth[split] = probabilities(folder, test_file)
            results[name][split] = scores_of(probs, truth[split])
            if name.startswith("own model"):
                own_probs.setdefault(split, []).append(probs)
        say(f"evaluated {name}")
    if shared_labels:
        results["output ensemble"] = {split: scores_of(torch.stack(probs).mean(0), truth[split])
                                      for split, probs in own_probs.items()}
    return results


def own_models(owners: list[Owner], shared_labels: bool) -> dict[str, dict[str, Path]]:
    if shared_labels:
        return {f"own model ({o.name})": {p.name: o.model for p in owners} for o in owners}
    return {"own models": {o.name: o.model for o in owners}}


def run_domains(workdir: Path, size: Size, held_out: str) -> dict:
    domains = [d for d in SENTIMENT_DOMAINS if d != held_out]
    labels = tuple(SENTIMENT_LABELS.values())
    owners = [prepare_owner(d, d, sentiment(d), labels, workdir, train=size.train, test=size.test,
                            epochs=size.epochs) for d in [*domains, held_out]]
    owners, outside = owners[:-1], owners[-1]
    pooled = write_jsonl([json.loads(line) for o in owners for line in o.train.read_text().splitlines()],
                         workdir / "data" / f"pooled-without-{held_out}.jsonl")
    say("multi-task reference: one model trained on the pooled data (cached after the first run)")
    multitask = finetune_multitask(minilm_dir(), {f"multitask-without-{held_out}": (
        pooled, FinetuneSettings(labels=labels, epochs=size.epochs))}, workdir / "owners")
    candidates = own_models(owners, True)
    candidates["multi-task (pooled data)"] = {o.name: next(iter(multitask.values())) for o in owners}
    candidates.update(federate(owners, workdir / f"without-{held_out}"))
    tests = {o.domain: o.test for o in [*owners, outside]}
    scores = evaluate_all(candidates, owners, tests, shared_labels=True)
    return {"held_out": held_out, "in_domain": domains, "scores": scores}


def run_tasks(workdir: Path, size: Size) -> dict:
    owners = []
    for task, (load, labels) in TASKS.items():
        owners.append(prepare_owner(task, task, load(), labels, workdir, train=size.train, test=size.test,
                                    epochs=size.epochs))
    say("multi-task reference: one body, a head per task, trained on all tasks' data (cached after the first run)")
    multitask = finetune_multitask(minilm_dir(), {f"multitask-{o.name}": (
        o.train, FinetuneSettings(labels=o.labels, epochs=size.epochs)) for o in owners}, workdir / "owners")
    candidates = own_models(owners, False)
    candidates["multi-task (pooled data)"] = {o.name: multitask[f"multitask-{o.name}"] for o in owners}
    candidates.update(federate(owners, workdir / "tasks"))
    scores = evaluate_all(candidates, owners, {o.domain: o.test for o in owners}, shared_labels=False)
    return {"held_out": None, "in_domain": [o.domain for o in owners], "scores": scores}


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean accuracy per model: in domain over the federation's splits, out of domain on the held-out split,
    averaged over runs (rotations)."""
    summary: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for name, by_split in run["scores"].items():
            entry = summary.setdefault(name.split(" (")[0] if name.startswith("own model") else name,
                                       {"in_domain": [], "out_of_domain": []})
            inside = [by_split[s]["accuracy"] for s in run["in_domain"] if s in by_split]
            if inside:
                entry["in_domain"].append(sum(inside) / len(inside))
            if run["held_out"] and run["held_out"] in by_split:
                entry["out_of_domain"].append(by_split[run["held_out"]]["accuracy"])
    return {name: {k: (sum(v) / len(v) if v else None) for k, v in entry.items()} for name, entry in summary.items()}


def own_scores(run: dict) -> dict[str, dict]:
    """Each in-domain split's score by the model of the owner it belongs to."""
    scores = run["scores"]
    return {split: scores[f"own model ({split})"][split] if f"own model ({split})" in scores
            else scores["own models"][split] for split in run["in_domain"]}


def retention_by_owner(run: dict) -> dict[str, dict[str, float]]:
    """The forgetting report of every candidate: per owner, its score on the owner's test split over the owner's own
    model's (:func:`fusion.forgetting.retention`; 1.0 keeps all the owner's model knew of its domain)."""
    own = own_scores(run)
    return {name: {split: retention(by_split[split], own[split])["retention"] for split in run["in_domain"]}
            for name, by_split in run["scores"].items()
            if not name.startswith("own model") and all(split in by_split for split in run["in_domain"])}


def retention_table(run: dict) -> str:
    """Retention per owner, its mean and the worst owner's: what each candidate forgets of each owner's model."""
    kept = retention_by_owner(run)
    lines = ["| model | " + " | ".join(run["in_domain"]) + " | mean | worst owner |",
             "|---" * (len(run["in_domain"]) + 3) + "|"]
    for name, by_owner in kept.items():
        values = [by_owner[split] for split in run["in_domain"]]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {sum(values) / len(values):.3f} | {min(values):.3f} |")
    return "\n".join(lines)


def domain_retention_table(domains: list[str], scores: dict) -> str:
    """The forgetting report of a setting whose owners are named by their domains (LLM, sentence pairs): per owner,
    each model's primary score on the owner's domain against the owner's own model's (:func:`retention`; a
    perplexity, lower being better, counts as the own over the model's), the mean and the worst owner."""
    def scored(value):
        return value if isinstance(value, dict) else {"perplexity": value}

    own = {d: scored(scores[f"own model ({d})"][d]) for d in domains}
    lines = ["Retention (the forgetting report: each owner's own model against the model, on the owner's domain):",
             "", "| model | " + " | ".join(domains) + " | mean | worst owner |", "|---" * (len(domains) + 3) + "|"]
    for name, by_domain in scores.items():
        if name.startswith("own model"):
            continue
        kept = [retention(scored(by_domain[d]), own[d])["retention"] for d in domains]
        lines.append(f"| {name} | " + " | ".join(f"{k:.3f}" for k in kept)
                     + f" | {sum(kept) / len(kept):.3f} | {min(kept):.3f} |")
    return "\n".join(lines)


def table(runs: list[dict], summary: dict) -> str:
    """The first run split by split (the held-out domain last), and with rotations the summary over all of them."""
    splits = runs[0]["in_domain"] + ([runs[0]["held_out"]] if runs[0]["held_out"] else [])
    header = "| model | " + " | ".join(splits) + " | mean in domain | out of domain |"
    lines = [header, "|---" * (len(splits) + 3) + "|"]
    first = runs[0]["scores"]
    for name, by_split in first.items():
        cells = [f"{by_split[s]['accuracy']:.3f}" if s in by_split else "" for s in splits]
        inside = [by_split[s]["accuracy"] for s in runs[0]["in_domain"] if s in by_split]
        mean = f"{sum(inside) / len(inside):.3f}" if inside else ""
        held_out = runs[0]["held_out"]
        outside = f"{by_split[held_out]['accuracy']:.3f}" if held_out in by_split else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} | {outside} |")
    lines += ["", "Retention (the forgetting report: accuracy on each owner's test split over the owner's own "
              "model's):", "", retention_table(runs[0])]
    if len(runs) > 1:
        lines += ["", "Averaged over the rotations (each domain held out once):", "",
                  "| model | mean in domain | out of domain |", "|---|---|---|"]
        for key, entry in summary.items():
            lines.append(f"| {key} | {entry['in_domain']:.3f} | "
                         + (f"{entry['out_of_domain']:.3f}" if entry["out_of_domain"] is not None else "") + " |")
    return "\n".join(lines)


def chart(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summary if not n.startswith("own model")] + [n for n in summary if n.startswith("own model")]
    inside = [summary[n]["in_domain"] or 0.0 for n in names]
    outside = [summary[n]["out_of_domain"] or 0.0 for n in names]
    figure, axes = plt.subplots(figsize=(10, 4.5))
    positions = range(len(names))
    axes.bar([p - 0.2 for p in positions], inside, width=0.4, label="in domain (mean)")
    if any(outside):
        axes.bar([p + 0.2 for p in positions], outside, width=0.4, label="out of domain")
    axes.set_xticks(list(positions), names, rotation=35, ha="right", fontsize=8)
    axes.set_ylim(min(v for v in inside + outside if v) - 0.05, 1.0)
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.legend(loc="upper right", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("domains", "tasks", "llm", "stsb"), default="domains")
    parser.add_argument("--full", action="store_true", help="larger splits; domains: rotate the held-out domain")
    parser.add_argument("--held-out", default="nyt", choices=SENTIMENT_DOMAINS, help="domains, default size")
    parser.add_argument("--workdir", type=Path, default=Path("runs/compare"))
    parser.add_argument("--from-results", type=Path, metavar="RESULTS_JSON",
                        help="domains, tasks: write the table, chart and forgetting report of an earlier run's "
                        "results.json into WORKDIR again, from its recorded scores (nothing is run)")
    args = parser.parse_args(argv)
    if args.from_results:
        recorded = json.loads(args.from_results.read_text())
        args.workdir.mkdir(parents=True, exist_ok=True)
        if recorded["setting"] in ("llm", "stsb"):
            return write_setting_results(recorded, args.workdir)
        return write_results(recorded, args.workdir, recorded["size"] == SIZES["full"].__dict__)
    started = time.perf_counter()
    size = SIZES["full" if args.full else "default"]
    workdir = (args.workdir / f"{args.setting}-{'full' if args.full else 'default'}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.setting in ("llm", "stsb"):
        return compare_setting(args.setting, workdir, args.full, started)
    if args.setting == "tasks":
        runs = [run_tasks(workdir, size)]
    else:
        held_outs = list(SENTIMENT_DOMAINS) if args.full else [args.held_out]
        runs = [run_domains(workdir, size, held_out) for held_out in held_outs]
    results = {"setting": args.setting, "size": size.__dict__, "methods": METHODS, "runs": runs,
               "seconds": round(time.perf_counter() - started, 1)}
    return write_results(results, workdir, args.full)


def write_results(results: dict, workdir: Path, full: bool) -> int:
    """The summary, the forgetting report, the table and the chart of finished runs, into ``workdir``."""
    runs, size, setting = results["runs"], Size(**results["size"]), results["setting"]
    summary = summarise(runs)
    results = {**results, "summary": summary, "retention": [retention_by_owner(run) for run in runs]}
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    text = table(runs, summary)
    (workdir / "results.md").write_text(text + "\n")
    chart(summary, workdir / "results.png", f"gramfuse on MiniLM-L6, {setting} ({'full' if full else 'default'})")
    print(f"\nAccuracy ({setting}; {size.train} training and {size.test} test examples per owner):\n")
    print(text)
    print(f"\n{workdir / 'results.json'}, results.md, results.png  ({results['seconds']:.0f} s)")
    return 0


def domain_chart(result: dict, value, ylabel: str, path: Path, title: str) -> None:
    """Bars per model, one per domain: ``value(scores of a model on a domain)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, scores = result["domains"], result["scores"]
    names = list(scores)
    figure, axes = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(domains)
    for index, domain in enumerate(domains):
        axes.bar([p + (index - (len(domains) - 1) / 2) * width for p in range(len(names))],
                 [value(scores[n][domain]) for n in names], width=width, label=domain)
    axes.set_xticks(list(range(len(names))), names, rotation=35, ha="right", fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def compare_setting(setting: str, workdir: Path, full: bool, started: float) -> int:
    """The LLM and sentence-pair settings: each module's ``run`` and ``table``, then one chart and the files."""
    from examples import llm, stsb

    module, size = (llm, llm.SIZES["full" if full else "default"]) if setting == "llm" else (
        stsb, replace(SIZES["full" if full else "default"], epochs=stsb.EPOCHS))  # regressors train longer
    result = module.run(workdir, size)
    results = {"setting": setting, "size": size.__dict__, "methods": module.METHODS, **result,
               "seconds": round(time.perf_counter() - started, 1)}
    return write_setting_results(results, workdir, full)


def write_setting_results(results: dict, workdir: Path, full: bool | None = None) -> int:
    """The LLM's or the sentence pairs' table (with its forgetting report), chart and JSON, into ``workdir``."""
    from examples import llm, stsb

    setting = results["setting"]
    module = llm if setting == "llm" else stsb
    if full is None:
        full = results["size"] == module.SIZES["full"].__dict__ if setting == "llm" else (
            results["size"]["train"] == SIZES["full"].train)
    size = SimpleNamespace(**results["size"])
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    text = module.table(results)
    (workdir / "results.md").write_text(text + "\n")
    label = "full" if full else "default"
    result = results
    if setting == "llm":
        domain_chart(result, float, "held-out perplexity (lower is better)", workdir / "results.png",
                     f"gramfuse on SmolLM2-135M, three text domains ({label})")
        print(f"\nHeld-out perplexity (llm; {size.train} training and {size.test} test passages per owner, "
              f"{size.steps} fine-tuning steps):\n")
    else:
        domain_chart(result, lambda s: s["pearson"], "Pearson correlation", workdir / "results.png",
                     f"gramfuse on MiniLM-L6, STS-B genres ({label})")
        print(f"\nPearson correlation (stsb; {size.train} training and {size.test} test pairs per genre, "
              f"{size.epochs} epochs):\n")
    print(text)
    print(f"\n{workdir / 'results.json'}, results.md, results.png  ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
