"""Run a module as ``python -m`` would, and report its own peak memory when it exits:

    python -m benchmarks.peak fusion.cli merge A B -o OUT

prints ``peak-rss-mb <N>`` as the last line on stderr (:func:`federation.memory.peak_rss_mb`: this process's own
high-water mark, not the benchmark's that forked it).
"""

from __future__ import annotations

import atexit
import runpy
import sys

from federation.memory import peak_rss_mb

MARKER = "peak-rss-mb"


def parse(stderr: str) -> float:
    """The peak a run of this module printed."""
    lines = [line for line in stderr.splitlines() if line.startswith(MARKER)]
    if not lines:
        raise ValueError(f"no {MARKER} line in the run's stderr")
    return float(lines[-1].split()[1])


if __name__ == "__main__":
    module, *arguments = sys.argv[1:]
    atexit.register(lambda: print(f"{MARKER} {peak_rss_mb():.1f}", file=sys.stderr, flush=True))
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
