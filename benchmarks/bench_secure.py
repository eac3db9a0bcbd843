"""Secure against plaintext mode for five owners of the bundled real model, measured in the same run (simulated
on this machine): wall time, bytes each owner sends, and how far apart the two merges are.

    python -m benchmarks.bench_secure [--owners 5]

Writes benchmarks/results/secure.json with the secure/plaintext ratios.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks import write_results
from examples.federation import largest_relative_difference, run

RESULTS = Path(__file__).parent / "results" / "secure.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_secure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--owners", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("runs/federation"))
    args = parser.parse_args(argv)
    domains = ["amazon", "movies", "tweets", "nyt", "rotten"]
    runs = {mode: run(args.owners, domains, "regmean", args.workdir, train=400, epochs=2, timeout=1800,
                      secure=mode == "secure") for mode in ("plaintext", "secure")}
    sent = {mode: statistics.mean(r["bytes_per_owner"].values()) for mode, r in runs.items()}
    workdir = args.workdir.resolve()
    result = {
        "runs": runs,
        "wall_seconds_ratio": round(runs["secure"]["wall_seconds"] / runs["plaintext"]["wall_seconds"], 3),
        "bytes_per_owner_ratio": round(sent["secure"] / sent["plaintext"], 3),
        "largest_relative_difference_secure_to_plaintext": largest_relative_difference(
            workdir / f"federated-{args.owners}-secure", workdir / f"federated-{args.owners}"),
    }
    write_results(RESULTS, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
