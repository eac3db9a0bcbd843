"""Run a module as ``python -m`` would, and report its own peak memory when it exits:

    python -m benchmarks.peak fusion.cli merge A B -o OUT

prints ``peak-rss-mb <N>`` as the last line on stderr. N is VmHWM of /proc/self/status: the high-water mark of
this process's own memory map. ``ru_maxrss`` of a child is no measure here: Linux keeps it across ``exec``, so it
includes the pages of the (large) benchmark process the child was forked from.
"""

from __future__ import annotations

import atexit
import runpy
import sys

MARKER = "peak-rss-mb"


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


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
