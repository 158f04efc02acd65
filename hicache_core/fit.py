"""One small fit the cost rules share: the time of an operation as latency + size x cost per unit."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional


def fit_latency(samples: Iterable[tuple[float, float]]) -> Optional[tuple[float, float]]:
    """(latency s, seconds per unit) fitted by least squares on (size, seconds) samples of positive sizes; None
    before any. One size seen, or a fit with a negative slope or latency (noise), gives the proportional model."""
    pts = list(samples)
    if not pts:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    var = sum((x - mx) ** 2 for x, _ in pts)
    if var > 0:
        slope = sum((x - mx) * (y - my) for x, y in pts) / var
        if slope > 0 and my - slope * mx >= 0:
            return my - slope * mx, slope
    return 0.0, my / mx
