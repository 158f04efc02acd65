"""Shared pieces of the benchmarks: timing, tables, JSON output."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def sync(device: torch.device | None = None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_best(fn: Callable[[], Any], repeat: int, device: torch.device | None = None, warmup: int = 1) -> float:
    """Median seconds of ``repeat`` runs after ``warmup`` runs (the first touches pages and caches)."""
    for _ in range(warmup):
        fn()
        sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


SETTLE_S = 0.02  # idle before each timed call: torch's OpenMP threads spin for some ms after a parallel op


def time_paired(
    base: Callable[[], Any], fn: Callable[[], Any], repeat: int, device: torch.device | None = None, warmup: int = 1
) -> tuple[float, float, float]:
    """``base`` and ``fn`` timed in alternation, ``repeat`` pairs after ``warmup``: (median base seconds, median
    fn seconds, median of the per-pair ratios base/fn). A pair shares the machine's state of the moment, so the
    ratio holds still where the memory bandwidth of a shared machine drifts. Each call starts on an idle machine
    (``SETTLE_S``): a torch copy leaves its OpenMP team spinning on the other cores for a few ms, and whatever ran
    next lost a core to it (measured on 2 cores: a 453 MB piece copy at 23.3 GB/s right after torch's copy, 27.3
    GB/s 10 ms later, 28 alone)."""
    for _ in range(warmup):
        base()
        fn()
        sync(device)
    tb: list[float] = []
    tf: list[float] = []
    for _ in range(repeat):
        for f, out in ((base, tb), (fn, tf)):
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            f()
            sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(tb), statistics.median(tf), statistics.median(b / f for b, f in zip(tb, tf))


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / max(seconds, 1e-12) / 1e9


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]] | str) -> None:
    """columns: (key, header, format) tuples, or one string of ``key=header:format`` columns separated by ``;``."""
    if isinstance(columns, str):
        columns = [_column(c) for c in columns.split(";") if c.strip()]
    cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h, _) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (_, h, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _column(text: str) -> tuple[str, str, str]:
    key, _, rest = text.strip().partition("=")
    header, _, fmt = rest.rpartition(":")
    return key, header, fmt


def dump_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


class Progress:
    """A tqdm bar on a terminal; one line per configuration when stderr is a log file; nothing when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.label, self.bar = "", None
        self.log = enabled and not sys.stderr.isatty()
        self.t0 = time.perf_counter()
        if enabled and not self.log:
            try:
                from tqdm import tqdm
            except ImportError:  # the bench extra brings it; without it, log lines
                self.log = True
            else:
                self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)

    def step(self, label: str = "") -> None:
        changed = bool(label) and label != self.label
        self.label = label or self.label
        if self.bar is not None:
            if changed:
                self.bar.set_description(self.label, refresh=False)
            self.bar.update(1)
        elif self.log and changed:
            sys.stderr.write(f"{self.label} ... ({time.perf_counter() - self.t0:.1f}s)\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.log:
            sys.stderr.write(f"done in {time.perf_counter() - self.t0:.1f}s\n")


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def drop_page_cache(root: str) -> int:
    """Evict every file under ``root`` from the OS page cache (written back first, then POSIX_FADV_DONTNEED), so
    the next reads come from the disk, as after a machine restart; returns how many files were dropped."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    dropped = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                dropped += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return dropped
