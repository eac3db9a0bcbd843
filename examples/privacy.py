"""Differentially private RegMean against epsilon and owner size, on the comparison's real owners (issue 13).

``--setting domains``: the four sentiment-domain owners (fine-tuned there on 400 examples each, cached) release DP
statistics at epsilon in {inf, 8, 4, 1, 0.5}, delta = 1 / N^2, over N examples of their domain: the 400 they were
fine-tuned on, or N = 3000 of the domain's rows (none from the test split). ``--setting llm``: the three SmolLM2
owners, over their 200 training passages, scored by perplexity. Each site's statistics are clipped once (one pass per
owner and size); every epsilon then draws its noise on them, as ``gramfuse stats --dp-epsilon`` would (the same
function), ``--seeds`` times. RegMean on the noisy statistics is scored on each owner's own test split and on the
held-out NYT domain, against averaging (needs no statistics: the floor DP RegMean falls back to) and RegMean on
exact statistics.

    python -m examples.privacy [--setting domains|llm] [--sizes 400 3000] [--epsilons 8 4 1 0.5] [--seeds 2]
                               [--noise local|distributed] [--workdir runs/compare]

``--noise distributed`` also runs secure Flower federations at the first size, each epsilon once with local noise
and once with distributed noise (each site a 1/threshold share; SECURITY.md), the sites reading with the
federation's settings.

Writes WORKDIR/privacy-<setting>.json, .md and .png (the score against epsilon, one line per size) and prints the
table.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from examples.owners import Owner, say
from examples.plusplus import HELD_OUT, Setting, correctness, metric_of, setting_of
from fusion.finish import MERGED
from fusion.merge import merge_folders
from fusion.methods import get_method
from fusion.privacy import PrivacySpec, privatise
from fusion.statistics import STATS_FILENAME, save_statistics
from fusion.workflows import compute_statistics, evaluate_folder

SENTIMENT = ("tweets", "movies", "amazon", "nyt", "rotten")


def site_folder(owner: Owner, root: Path) -> Path:
    """A folder of links to the owner's model, where this experiment's statistics files go (the cached owner's own
    statistics stay as they are)."""
    folder = root / owner.name
    folder.mkdir(parents=True, exist_ok=True)
    for source in owner.model.iterdir():
        link = folder / source.name
        if source.is_file() and not source.name.startswith(STATS_FILENAME.split(".")[0]) and not link.exists():
            link.symlink_to(source.resolve())
    return folder


def statistics_rows(owner: Owner, size: int, root: Path) -> Path:
    """``size`` rows of the owner's domain for its statistics: its training file when that is the size, else the
    domain's rows outside the test split."""
    from examples.assets import sentiment

    train_rows = owner.train.read_text().splitlines()
    if size == len(train_rows):
        return owner.train
    if owner.domain not in SENTIMENT:
        raise SystemExit(f"{owner.domain}: statistics over other rows than the training file are for the sentiment "
                         f"domains only; give --sizes {len(train_rows)}")
    tests = {json.loads(line)["text"] for line in owner.test.read_text().splitlines()}
    rows = [row for row in sentiment(owner.domain) if row["text"] not in tests][:size]
    if len(rows) < size:
        raise SystemExit(f"{owner.domain}: only {len(rows)} rows outside the test split, fewer than {size}")
    path = root / f"{owner.domain}-{size}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def scores(folder: Path, setting: Setting) -> dict[str, float]:
    if setting.metric == "perplexity":
        return {split: evaluate_folder(folder, test, settings=setting.data, progress=False)["perplexity"]
                for split, test in setting.tests.items()}
    return {split: float(metric_of("accuracy", correctness(folder, test))) for split, test in setting.tests.items()}


def summary(per_split: dict[str, float], owners: list[Owner]) -> dict[str, float]:
    inside = [per_split[o.domain] for o in owners]
    return {"mean_in_domain": sum(inside) / len(inside),
            **({"held_out": per_split[HELD_OUT]} if HELD_OUT in per_split else {})}


def merge_and_score(folders: list[Path], method: str, out: Path, setting: Setting) -> dict:
    report = merge_folders(folders, out, get_method(method), overwrite=True)
    result = summary(scores(out / MERGED, setting), setting.owners)
    layers = [layer for layer in report.get("layers", {}).values() if layer.get("ridge") is not None]
    if layers:
        result["mean_ridge"] = sum(layer["ridge"] for layer in layers) / len(layers)
    return result


def run(name: str, sizes: list[int], epsilons: list[float], seeds: int, workdir: Path) -> dict:
    setting = setting_of(name, workdir)
    owners = setting.owners
    root = workdir / f"privacy-{name}"
    folders = [site_folder(owner, root / "sites") for owner in owners]
    results: dict = {"setting": name, "metric": setting.metric, "sizes": {}}
    say("averaging (no statistics)")
    results["average"] = merge_and_score(folders, "average", root / "average", setting)
    for size in sizes:
        data = [statistics_rows(owner, size, root) for owner in owners]
        by_size: dict = {}
        for folder, data_file in zip(folders, data):  # exact RegMean: the ceiling at this size
            compute_statistics(folder, data_file, settings=setting.data, progress=False)
        by_size["exact"] = merge_and_score(folders, "regmean", root / f"exact-{size}", setting)
        say(f"N={size}: exact RegMean {by_size['exact']}")
        clipped = []
        for owner, folder, data_file in zip(owners, folders, data):
            stats, _ = compute_statistics(folder, data_file, settings=setting.data, progress=False,
                                          privacy=PrivacySpec(epsilon=1.0), draw_noise=False)
            clipped.append(stats)
            say(f"N={size}: {owner.name} clipped, {stats.clipped_examples / stats.example_count:.0%} of "
                "examples scaled down")
        for stats, folder in zip(clipped, folders):
            save_statistics(stats, folder / STATS_FILENAME)
        by_size["inf"] = merge_and_score(folders, "regmean", root / f"clipped-{size}", setting)
        say(f"N={size}: clipped, no noise {by_size['inf']}")
        for epsilon in epsilons:
            draws = []
            for seed in range(seeds):
                for index, (stats, folder) in enumerate(zip(clipped, folders)):
                    noisy = replace(stats, grams={k: v.clone() for k, v in stats.grams.items()},
                                    settings=dict(stats.settings))
                    release = privatise(noisy, PrivacySpec(epsilon=epsilon, seed=1000 * seed + index))
                    save_statistics(noisy, folder / STATS_FILENAME)
                draws.append(merge_and_score(folders, "regmean", root / f"dp-{size}-{epsilon:g}", setting))
            by_size[f"{epsilon:g}"] = {
                key: sum(d[key] for d in draws) / len(draws) for key in draws[0]} | {
                "draws": draws, "delta": release.delta, "noise_std": release.noise_std,
                "noise_multiplier": release.noise_multiplier}
            say(f"N={size}: epsilon {epsilon:g}: {by_size[f'{epsilon:g}']['mean_in_domain']:.3f} in domain "
                f"({setting.metric})")
        results["sizes"][str(size)] = by_size
    return results


def weight_bound(folders: list[Path]) -> float:
    """A public bound on every merged layer's spectral norm for distributed noise: here the owners' largest, rounded
    up (a real federation agrees on one beforehand, from the pretrained model and a margin)."""
    from fusion.checkpoint import load_model
    from fusion.gram import linear_modules
    from fusion.privacy import spectral_norm

    largest = 0.0
    for folder in folders:
        model, _ = load_model(folder)
        largest = max([largest, *(spectral_norm(module.weight) for _, module, _ in linear_modules(model))])
    return float(math.ceil(largest))


def federated_runs(name: str, size: int, epsilons: list[float], workdir: Path) -> dict:
    """DP RegMean through secure Flower simulations, one per epsilon and noise: ``local`` (each site's statistics
    carry all the noise its release needs) and ``distributed`` (each site adds 1/threshold of one noise to its
    Grams and, calibrated to the public weight bound, to its products with the weights), delta = 1/N^2. The sites
    read with the federation's own settings, the same for both."""
    from server.processes import Loopback

    setting = setting_of(name, workdir)
    root = workdir / f"privacy-{name}"
    folders = [site_folder(owner, root / "federated-sites") for owner in setting.owners]
    workspace = root / "federated-workspace"
    for owner, folder in zip(setting.owners, folders):
        (workspace / owner.name).mkdir(parents=True, exist_ok=True)
        for link, target in (("model", folder), ("data.jsonl", statistics_rows(owner, size, root))):
            if not (workspace / owner.name / link).exists():
                (workspace / owner.name / link).symlink_to(target.resolve())
    bound = weight_bound(folders)
    delta = 1.0 / size ** 2
    results: dict = {"size": size, "weight_bound": bound, "delta": delta, "local": {}, "distributed": {}}
    for epsilon in epsilons:
        for noise in ("local", "distributed"):
            out = root / f"federated-{noise}-{epsilon:g}"
            simulation = Loopback(root / "flower", simulation=True)
            say(f"N={size}: epsilon {epsilon:g}, {noise} noise: a secure federated round of {len(folders)} sites")
            try:
                simulation.start_superlink()
                done = simulation.run(
                    f"workspace='{workspace}' out-dir='{out}' method='regmean' secure=true dp-noise='{noise}' "
                    f"dp-epsilon={epsilon} dp-delta={delta} dp-clip=1.0 dp-weight-bound={bound} "
                    f"dp-budget=1000000.0 min-owners={len(folders)} timeout=3000", num_supernodes=len(folders),
                    timeout=3300, capture=False)
            finally:
                simulation.stop()
            if done.returncode != 0 or not (out / "report.json").is_file():
                raise SystemExit(f"the federated round failed; see the logs in {simulation.root}")
            report = json.loads((out / "report.json").read_text())
            result = summary(scores(out / MERGED, setting), setting.owners)
            layers = report["layers"].values()
            result["mean_noise_std"] = sum(layer.get("noise_std", 0.0) for layer in layers) / len(layers)
            result["mean_ridge"] = sum(layer.get("ridge", 0.0) for layer in layers) / len(layers)
            results[noise][f"{epsilon:g}"] = result
            say(f"N={size}: epsilon {epsilon:g}, {noise} noise: {result['mean_in_domain']:.3f} in domain "
                f"({setting.metric})")
    return results


def federated_table(results: dict, epsilons: list[float]) -> str:
    """Local against distributed noise in secure federations, at each epsilon."""
    federated = results["federated"]
    columns = [f"{e:g}" for e in epsilons]
    lines = [f"| secure federation, N = {federated['size']} | " + " | ".join(f"epsilon {c}" for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for noise, label in (("local", "local noise (each site all of it)"),
                         ("distributed", "distributed noise (each site 1/threshold)")):
        lines.append(f"| {label} | " + " | ".join(cell(federated[noise][c]) for c in columns) + " |")
    lines += ["", f"Weight bound (largest spectral norm of any owner's layer, rounded up): {federated['weight_bound']:g}."]
    return "\n".join(lines)


def table(results: dict, epsilons: list[float]) -> str:
    columns = ["exact", "inf", *[f"{e:g}" for e in epsilons]]
    header = ["N", "exact RegMean", "clipped, epsilon inf", *[f"epsilon {c}" for c in columns[2:]]]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for size, by_size in results["sizes"].items():
        lines.append(f"| {size} | " + " | ".join(cell(by_size[c]) for c in columns) + " |")
    held_out = " / on held-out NYT" if "held_out" in results["average"] else ""
    lines += ["", f"Cells: mean {results['metric']} on the owners' own test splits{held_out}. Averaging (the floor): "
              f"{cell(results['average'])}."]
    return "\n".join(lines)


def cell(result: dict) -> str:
    values = [result["mean_in_domain"]] + ([result["held_out"]] if "held_out" in result else [])
    return " / ".join(f"{value:.3f}" if value < 10 else f"{value:.2f}" for value in values)


def chart(results: dict, epsilons: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    finite = sorted(epsilons)
    positions = [*finite, max(finite) * 4]  # "inf" drawn to the right of the largest epsilon
    for size, by_size in results["sizes"].items():
        values = [by_size[f"{e:g}"]["mean_in_domain"] for e in finite] + [by_size["inf"]["mean_in_domain"]]
        axis.plot(positions, values, marker="o", label=f"DP RegMean, N = {size} per owner")
        axis.axhline(by_size["exact"]["mean_in_domain"], linestyle=":", linewidth=1, color=axis.lines[-1].get_color())
    federated = results.get("federated")
    for noise, style in (("local", "s"), ("distributed", "x")) if federated else ():
        values = [federated[noise][f"{e:g}"]["mean_in_domain"] for e in finite]
        axis.plot(finite, values, marker=style, linestyle="-.",
                  label=f"secure federation, {noise} noise, N = {federated['size']}")
    axis.axhline(results["average"]["mean_in_domain"], color="black", linestyle="--", label="averaging (no statistics)")
    axis.set_xscale("log")
    axis.set_xticks(positions, [f"{e:g}" for e in finite] + ["inf"])
    axis.set_xlabel("epsilon (delta = 1/N^2, per owner)")
    axis.set_ylabel(f"{results['metric']}, mean over the owners' test splits")
    title = {"domains": "Sentiment domains, 4 owners", "llm": "SmolLM2-135M, 3 owners"}[results["setting"]]
    axis.set_title(f"{title}: DP RegMean against epsilon\n(dotted: RegMean on exact statistics)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.privacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("domains", "llm"), default="domains")
    parser.add_argument("--sizes", type=int, nargs="+", help="examples per owner's statistics (default: 400 3000 "
                        "for the domains, the 200 training passages for the LLM)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 1.0, 0.5])
    parser.add_argument("--seeds", type=int, default=2, help="noise draws per epsilon (scores are their mean)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/compare"))
    parser.add_argument("--noise", choices=("local", "distributed"), default="local",
                        help="distributed: also secure federations with local and with distributed noise, at each "
                        "epsilon (first size only)")
    args = parser.parse_args(argv)
    if any(not math.isfinite(e) or e <= 0 for e in args.epsilons):
        parser.error("epsilons are positive numbers (infinity is always run)")
    workdir = args.workdir.resolve()
    sizes = args.sizes or ([400, 3000] if args.setting == "domains" else [200])
    results = run(args.setting, sizes, args.epsilons, args.seeds, workdir)
    if args.noise == "distributed":
        results["federated"] = federated_runs(args.setting, sizes[0], args.epsilons, workdir)
    text = table(results, args.epsilons)
    if "federated" in results:
        text += "\n\n" + federated_table(results, args.epsilons)
    name = f"privacy-{args.setting}"
    (workdir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (workdir / f"{name}.md").write_text(text + "\n")
    chart(results, args.epsilons, workdir / f"{name}.png")
    print(f"\nDP RegMean, {args.setting}:\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
