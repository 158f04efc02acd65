"""Making a benchmark's numbers trustworthy: CPU taken by other processes, first-call costs, spread over repeats.

* :class:`CpuMeter` reads the machine's busy CPU time (``/proc/stat``) and this process's own (``os.times``,
  children included) around a run: what other processes used, in cores, is what contended the run. A figure
  measured while others took more than :data:`CONTENDED_CORES` is flagged in the report.
* :func:`warm_up` pays first-call costs (allocator growth, kernel selection, lazy imports) on a throwaway engine,
  so the first timed request of a fresh process measures the cache and not the process.
* :func:`spread` summarises one figure over ``--repeat`` runs.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Optional

from hicache_core.engine.engine import warm_up  # noqa: F401  (the benches import it from here)

CONTENDED_CORES = 0.5  # other processes' CPU during a run, in cores, past which its timings are flagged


def _proc_stat() -> Optional[tuple[float, float]]:
    """(busy seconds, total seconds) of all CPUs since boot; None where /proc/stat is not there."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """``with CpuMeter() as m: ...`` then ``m.result()``: wall seconds, own and others' CPU in cores."""

    def __enter__(self) -> CpuMeter:
        self._wall, self._own, self._sys = time.perf_counter(), _own_cpu(), _proc_stat()
        self._end: Optional[tuple[float, float, Optional[tuple[float, float]]]] = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self._end = (time.perf_counter(), _own_cpu(), _proc_stat())

    def result(self) -> dict[str, Any]:
        assert self._end is not None, "use CpuMeter as a context manager"
        wall = max(1e-9, self._end[0] - self._wall)
        own = (self._end[1] - self._own) / wall
        out: dict[str, Any] = {"wall_s": wall, "own_cores": own, "others_cores": None, "contended": False}
        if self._sys is not None and self._end[2] is not None:
            others = max(0.0, (self._end[2][0] - self._sys[0]) / wall - own)
            out["others_cores"] = others
            out["contended"] = others > CONTENDED_CORES
        return out


def spread(values: list[Optional[float]]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": values}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": values}
