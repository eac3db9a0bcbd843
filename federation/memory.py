"""How much memory this process has used at its peak, as the server reports it and the benchmarks measure it."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """VmHWM of /proc/self/status: the high-water mark of this process's own memory map. ``ru_maxrss`` is no measure
    of a child process here: Linux keeps it across ``exec``, so it counts the pages of the process it was forked
    from (Flower's SuperExec, a benchmark)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
