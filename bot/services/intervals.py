"""95% intervals for shares and means, and when two of them tell models apart.

Small pure functions: the evaluation's win rate and the canary's comparisons use them.
A share gets Wilson's score interval (it stays inside [0, 1] and behaves at 0 and n, where
the textbook "p ± 1.96·√(p(1-p)/n)" collapses to a point); a mean gets the normal
approximation mean ± 1.96·s/√n, fair for the hundreds of replies a comparison needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95% interval


@dataclass(frozen=True, slots=True)
class Interval:
    """An estimate with its 95% interval, and how many observations are behind it."""

    value: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def wilson(successes: float, n: int, z: float = Z95) -> Interval:
    """Wilson's score interval for `successes` out of `n` (a tie may count as half a success).

    With n = 0 nothing is known: the interval is [0, 1].
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError("need 0 <= successes <= n")
    if n == 0:
        return Interval(0.0, 0.0, 1.0, 0)
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # Rounding must not put the bounds a hair outside [0, 1] or on the wrong side of p.
    return Interval(p, max(0.0, min(p, centre - spread)), min(1.0, max(p, centre + spread)), n)


def mean_interval(n: int, total: float, total_squares: float, z: float = Z95) -> Interval:
    """The mean of `n` values from their sum and sum of squares, with mean ± z·s/√n.

    Fewer than two values give no spread: the interval is the mean itself (n = 1) or
    nothing at all (n = 0, an interval of NaNs).
    """
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = total / n
    if n == 1:
        return Interval(mean, mean, mean, 1)
    variance = max(0.0, (total_squares - n * mean * mean) / (n - 1))
    spread = z * math.sqrt(variance / n)
    return Interval(mean, mean - spread, mean + spread, n)


def separated(a: Interval, b: Interval) -> bool:
    """Whether two intervals do not overlap: only then is a difference called."""
    if a.n == 0 or b.n == 0 or math.isnan(a.low) or math.isnan(b.low):
        return False
    return a.high < b.low or b.high < a.low


def more_needed(a: Interval, b: Interval) -> int | None:
    """Roughly how many more observations (both arms together, in their present proportion)
    would make the intervals separate if the two estimates stayed where they are.

    Intervals narrow as 1/√n: with both arms k times larger, the half-widths shrink by √k,
    and they separate once (h_a + h_b)/√k < |a - b|. None when that can't be said: no
    difference seen yet (or no data), where no amount of data can be promised.
    """
    if a.n == 0 or b.n == 0:
        return None
    gap = abs(a.value - b.value)
    spread = a.half_width + b.half_width
    if math.isnan(gap) or math.isnan(spread) or gap <= 1e-12:
        return None
    if spread < gap:
        return 0
    k = (spread / gap) ** 2
    return max(1, math.ceil((a.n + b.n) * (k - 1)))


def more_to_leave(a: Interval, point: float, limit: int = 10_000_000) -> int | None:
    """Roughly how many more observations would put a share's Wilson interval wholly on one
    side of `point` (the evaluation's 50%) if the share stayed where it is: 0 if it already
    is; None with no data, a share on the point itself, or more than `limit` in all."""
    if a.n == 0 or math.isnan(a.value) or abs(a.value - point) <= 1e-12:
        return None

    def leaves(n: int) -> bool:
        interval = wilson(a.value * n, n)
        return interval.low > point or interval.high < point

    if leaves(a.n):
        return 0
    low, high = a.n, 2 * a.n  # an interval narrows as n grows: the first n that leaves
    while not leaves(high):
        low, high = high, 2 * high
        if high > limit:
            return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if leaves(middle) else (middle, high)
    return high - a.n
