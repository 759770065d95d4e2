"""Latency histograms: log-linear buckets on integer microseconds (HdrHistogram-like).

Memory is bounded by the value range, not by the number of samples, so the
analysis stays streaming.  Layout (``SUB = 1024``):

* values ``0 .. 2047`` µs have a bucket each: **exact**;
* above, a value ``v`` with ``e = v.bit_length() - 11`` (so ``v >> e`` is in
  ``1024 .. 2047``) falls in a bucket ``2**e`` wide: bucket index
  ``2048 + (e - 1) * 1024 + (v >> e) - 1024``.  A bucket spans less than
  ``v / 1024``, so any value reported from it is within **1/1024** (relative)
  of every sample in it.

Reported values are the *highest* value of the bucket (clamped to the exact
maximum), so an upper bound is never under-reported.  ``min``, ``max`` and
``count`` are exact.

**Percentile definition (nearest rank):** the p-th percentile of ``N`` samples is
the smallest recorded value ``x`` such that at least ``ceil(p / 100 * N)``
samples are ``<= x`` (rank at least 1), computed with exact rational arithmetic
(no float rounding at p99.9).

**Censored samples:** a latency that never ended (a token still outstanding
at the end of the trace) is recorded with its age at the end and flagged
``censored``: it is a *lower bound*.  It takes part in the percentiles like any
sample (so a stall can never make a distribution look fast) and is counted in
:attr:`Histogram.censored`; the censored values are also kept in their own
buckets so reports can show them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Final, NamedTuple

#: Values below this are stored exactly.
EXACT_LIMIT: Final = 2048
_SUB: Final = 1024
_SUB_BITS: Final = 10

#: The keys of :meth:`Histogram.summary`, in order (the verdict.json contract).
SUMMARY_KEYS = ("count", "p50", "p90", "p99", "p999", "max")
#: The percentiles behind ``p50 .. p999``.
PERCENTILES: tuple[tuple[str, str], ...] = (
    ("p10", "10"),  # an addition to the contract: the floor a late ACK moves
    ("p50", "50"),
    ("p90", "90"),
    ("p99", "99"),
    ("p999", "99.9"),
)


def bucket_index(value: int) -> int:
    """The bucket of a non-negative integer ``value``."""
    if value < EXACT_LIMIT:
        return value
    e = value.bit_length() - _SUB_BITS - 1
    return EXACT_LIMIT + (e - 1) * _SUB + (value >> e) - _SUB


def bucket_bounds(index: int) -> tuple[int, int]:
    """The lowest and highest value (inclusive) that fall in bucket ``index``."""
    if index < EXACT_LIMIT:
        return index, index
    e, sub = divmod(index - EXACT_LIMIT, _SUB)
    e += 1
    low = (sub + _SUB) << e
    return low, low + (1 << e) - 1


class Bucket(NamedTuple):
    """One non-empty bucket: value range (inclusive), samples and censored samples."""

    low: int
    high: int
    samples: int
    censored: int


class Histogram:
    """A streaming latency histogram on integer microseconds.

    >>> h = Histogram()
    >>> for v in (100, 200, 300):
    ...     h.record(v)
    >>> h.summary()["p50"]
    200
    """

    __slots__ = ("_censored", "_counts", "censored", "count", "max", "min", "total")

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._censored: dict[int, int] = {}
        #: number of samples
        self.count = 0
        #: number of censored samples (lower bounds)
        self.censored = 0
        #: exact smallest sample, None when empty
        self.min: int | None = None
        #: exact largest sample, None when empty
        self.max: int | None = None
        #: exact sum of the samples (for a mean)
        self.total = 0

    def record(self, value: int, censored: bool = False) -> None:
        """Add one sample (µs; negative values are clamped to 0).

        :param censored: the latency had not ended when observation stopped;
            ``value`` is a lower bound
        """
        v = value if value > 0 else 0
        i = v if v < EXACT_LIMIT else bucket_index(v)
        counts = self._counts
        counts[i] = counts.get(i, 0) + 1
        self.count += 1
        self.total += v
        if self.max is None or v > self.max:
            self.max = v
        if self.min is None or v < self.min:
            self.min = v
        if censored:
            self.censored += 1
            self._censored[i] = self._censored.get(i, 0) + 1

    def merge(self, other: Histogram) -> None:
        """Add all samples of ``other`` into this histogram."""
        for i, c in other._counts.items():
            self._counts[i] = self._counts.get(i, 0) + c
        for i, c in other._censored.items():
            self._censored[i] = self._censored.get(i, 0) + c
        self.count += other.count
        self.censored += other.censored
        self.total += other.total
        if other.max is not None and (self.max is None or other.max > self.max):
            self.max = other.max
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min

    def value_at_rank(self, rank: int) -> int:
        """The value of the ``rank``-th smallest sample (1-based), as reported.

        :raises ValueError: ``rank`` is outside ``1 .. count``
        """
        if not 1 <= rank <= self.count:
            raise ValueError(f"rank {rank} outside 1..{self.count}")
        seen = 0
        for i in sorted(self._counts):
            seen += self._counts[i]
            if seen >= rank:
                high = bucket_bounds(i)[1]
                assert self.max is not None  # count > 0
                return min(high, self.max)
        raise AssertionError("unreachable: counts add up to count")

    def percentile(self, p: float | str) -> int | None:
        """The nearest-rank ``p``-th percentile (see the module doc); None when empty.

        :param p: a percentage in ``(0, 100]``; a string (``"99.9"``) is exact
        """
        if self.count == 0:
            return None
        frac = Fraction(p) if isinstance(p, str) else Fraction(str(p))
        if not 0 < frac <= 100:
            raise ValueError(f"percentile {p} outside (0, 100]")
        rank = max(1, math.ceil(frac * self.count / 100))
        return self.value_at_rank(rank)

    def summary(self) -> dict[str, int | None]:
        """``{"count", "p50", "p90", "p99", "p999", "max", "censored"}`` in µs.

        Values are None when the histogram is empty (``count`` is 0).  The
        ``censored`` key is an addition to the verdict.json contract.
        """
        out: dict[str, int | None] = {"count": self.count}
        for key, p in PERCENTILES:
            out[key] = self.percentile(p)
        out["max"] = self.max
        out["censored"] = self.censored
        return out

    def buckets(self) -> Iterator[Bucket]:
        """The non-empty buckets in increasing value order (``high`` clamped to max)."""
        for i in sorted(self._counts):
            low, high = bucket_bounds(i)
            if self.max is not None and high > self.max:
                high = self.max
            yield Bucket(low, high, self._counts[i], self._censored.get(i, 0))

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, censored={self.censored}, max={self.max})"
