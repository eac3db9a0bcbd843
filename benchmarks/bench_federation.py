"""The federation's cost on the bundled real model: wall time, bytes per owner, and the server's peak memory for
a small and a large federation, measured in the same run (simulated on this machine).

    python -m benchmarks.bench_federation [--owners 2 8]

The server's memory should not grow with the number of owners: it holds one reply plus the sums. Writes
benchmarks/results/federation.json with the ratio of peak memory, largest to smallest federation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import write_results
from examples.federation import run

RESULTS = Path(__file__).parent / "results" / "federation.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_federation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--owners", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--workdir", type=Path, default=Path("runs/federation"))
    args = parser.parse_args(argv)
    domains = ["amazon", "movies", "tweets", "nyt"]
    runs = {count: run(count, domains, "regmean", args.workdir, train=400, epochs=2, timeout=1800)
            for count in args.owners}
    smallest, largest = min(runs), max(runs)
    result = {
        "runs": runs,
        "server_peak_rss_ratio": round(runs[largest]["server_peak_rss_mb"] / runs[smallest]["server_peak_rss_mb"], 3),
        "owners_ratio": largest / smallest,
    }
    write_results(RESULTS, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
