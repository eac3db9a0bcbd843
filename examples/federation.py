"""A simulated federation of real data owners on the bundled MiniLM, checked against the offline CLI.

Each owner fine-tunes all-MiniLM-L6-v2 on a real VADER sentiment domain (cached), then Flower's simulation engine
runs one node per owner: each node computes its statistics at its "site" and sends them with its weights; the
server folds them into sums and merges. The same folders are then merged offline by `gramfuse merge`, and the two
results compared.

    python -m examples.federation [--owners 3] [--method regmean] [--secure] [--workdir runs/federation]

Prints wall time, bytes received per owner and the server's peak memory; writes WORKDIR/federation.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file

from examples.assets import VADER_DOMAINS
from examples.owners import prepare_owners, say
from fusion.cli import main as gramfuse
from server.processes import Loopback


def workspace_of(owners, folder: Path) -> Path:
    """The simulation's workspace: <owner>/model and <owner>/data.jsonl, as links to the owners' files."""
    shutil.rmtree(folder, ignore_errors=True)
    for owner in owners:
        (folder / owner.name).mkdir(parents=True)
        (folder / owner.name / "model").symlink_to(owner.model.resolve())
        (folder / owner.name / "data.jsonl").symlink_to(owner.train.resolve())
    return folder


def largest_relative_difference(a: Path, b: Path) -> float:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((left[k] - right[k]).abs().max() / right[k].abs().max().clamp_min(1e-12)) for k in right)


def run(count: int, domains: list[str], method: str, workdir: Path, train: int, epochs: int, timeout: int,
        secure: bool = False) -> dict:
    workdir = workdir.resolve()  # the sites and the server run in folders of their own
    owners = prepare_owners(domains, count, workdir, train=train, test=200, epochs=epochs)
    mode = "secure" if secure else "plaintext"
    workspace = workspace_of(owners, workdir / f"workspace-{count}")
    out = workdir / f"federated-{count}" if not secure else workdir / f"federated-{count}-secure"
    for owner in owners:  # a fresh start: every simulated site computes its statistics itself
        (owner.model / "gramfuse-stats.safetensors").unlink(missing_ok=True)
    simulation = Loopback(workdir / f"flower-{count}-{mode}", simulation=True)
    say(f"simulating {count} sites with Flower ({method}, {mode}); per-site progress follows")
    started = time.perf_counter()
    try:
        simulation.start_superlink()
        done = simulation.run(f"workspace='{workspace}' out-dir='{out}' method='{method}' min-owners={count} "
                              f"timeout={timeout} secure={str(secure).lower()}", num_supernodes=count, timeout=timeout + 120, capture=False)
    finally:
        simulation.stop()
    wall = time.perf_counter() - started
    if done.returncode != 0 or not (out / "report.json").is_file():
        raise SystemExit(f"the federated run failed; see {simulation.root}")
    report = json.loads((out / "report.json").read_text())["federation"]

    say("the same folders through the offline CLI")
    offline = workdir / f"offline-{count}"
    gramfuse(["merge", *(str(o.model) for o in owners), "-o", str(offline), "--method", method, "--overwrite",
              "--quiet"])
    summary = {
        "owners": count,
        "method": method,
        "mode": mode,
        "wall_seconds": round(wall, 1),
        "server_seconds": report["timings"],
        "bytes_per_owner": {o["site"]: o["bytes_received"] for o in report["owners"].values()},
        "server_peak_rss_mb": report["server_peak_rss_mb"],
        "largest_relative_difference_to_offline": largest_relative_difference(out, offline),
    }
    (workdir / f"federation-{count}-{mode}.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.federation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--owners", type=int, default=3)
    parser.add_argument("--domains", nargs="+", default=["amazon", "movies", "tweets", "nyt"],
                        choices=sorted(VADER_DOMAINS))
    parser.add_argument("--method", default="regmean")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--workdir", type=Path, default=Path("runs/federation"))
    parser.add_argument("--secure", action="store_true", help="secure aggregation: the server decodes only sums")
    args = parser.parse_args(argv)
    summary = run(args.owners, args.domains, args.method, args.workdir, args.train, args.epochs, args.timeout,
                  secure=args.secure)
    print(json.dumps(summary, indent=2))
    return 0 if summary["largest_relative_difference_to_offline"] <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
