"""Spread a batch of page I/O over a thread pool: one contiguous chunk per worker, results in order.

One task per chunk rather than per page: per-task dispatch costs about as much as reading a 256 KiB page.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from typing import Optional, TypeVar

T = TypeVar("T")


def map_chunked(pool: Optional[cf.ThreadPoolExecutor], workers: int, count: int, fn: Callable[[int], T]) -> list[T]:
    """``[fn(0), ..., fn(count - 1)]``, the caller's thread taking the first chunk."""
    k = min(workers, count)
    if k <= 1 or pool is None:
        return [fn(i) for i in range(count)]
    bounds = [count * i // k for i in range(k + 1)]

    def chunk(a: int, b: int) -> list[T]:
        return [fn(i) for i in range(a, b)]

    futures = [pool.submit(chunk, bounds[i], bounds[i + 1]) for i in range(1, k)]
    out = chunk(bounds[0], bounds[1])
    for f in futures:
        out += f.result()
    return out
