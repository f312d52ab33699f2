"""A robust trend: the Theil-Sen slope of samples against time, with its confidence interval.

The slope is the median of the slopes between every pair of samples, so a few samples that
swing far (a busy server's buffers come and go) barely move it, while a steady climb moves
all of them. Its interval is Sen's: with n samples, the N pairwise slopes sorted, and
C = z * sqrt(n (n - 1) (2n + 5) / 18) (the spread of Kendall's S when nothing ties), the
bounds are the slopes of rank (N - C) / 2 and (N + C) / 2. The fitted level at a time t is
the median of y - slope * t, plus slope * t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959964  # the normal quantile of 0.975: a two-sided 95% interval


@dataclass(frozen=True)
class Trend:
    slope: float  # y per unit of t
    low: float  # the interval's bounds of the slope
    high: float
    intercept: float  # the fitted level at t = 0

    def level(self, t: float) -> float:
        return self.intercept + self.slope * t


def theil_sen(t: Sequence[float], y: Sequence[float], z: float = Z_95) -> Trend | None:
    """The trend of y against t; None with fewer than 3 samples at distinct times."""
    times, values = np.asarray(t, dtype=np.float64), np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(len(times), k=1)
    apart = times[j] != times[i]
    slopes = np.sort((values[j] - values[i])[apart] / (times[j] - times[i])[apart])
    n, pairs = len(times), len(slopes)
    if n < 3 or pairs < 3:
        return None
    slope = float(np.median(slopes))
    spread = z * math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    low = slopes[max(0, math.floor((pairs - spread) / 2))]
    high = slopes[min(pairs - 1, math.ceil((pairs + spread) / 2))]
    intercept = float(np.median(values - slope * times))
    return Trend(slope, float(low), float(high), intercept)
