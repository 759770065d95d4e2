"""The log-linear histogram: exactness, error bound, nearest rank, censoring, merge."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from apflab.analysis import parse
from apflab.analysis.parse import Kind
from apflab.analysis.stats import EXACT_LIMIT, Histogram, bucket_bounds, bucket_index

TRACES = Path(__file__).parent / "fixtures" / "traces"


def nearest_rank(values: list[int], p: float) -> int:
    """The textbook definition, on the exact sorted samples."""
    s = sorted(values)
    rank = max(1, math.ceil(round(p * len(s) / 100, 9)))
    return s[rank - 1]


def test_exact_below_2048() -> None:
    rng = random.Random(1)
    values = [rng.randrange(EXACT_LIMIT) for _ in range(5000)]
    h = Histogram()
    for v in values:
        h.record(v)
    for p in (1, 10, 50, 90, 99, 99.9, 100):
        assert h.percentile(p) == nearest_rank(values, p)
    assert (h.min, h.max, h.count) == (min(values), max(values), 5000)


def test_relative_error_at_most_1_in_1024_and_never_under() -> None:
    rng = random.Random(2)
    values = [int(10 ** rng.uniform(3, 10)) for _ in range(20000)]
    h = Histogram()
    for v in values:
        h.record(v)
    for p in (50, 90, 99, 99.9):
        exact = nearest_rank(values, p)
        got = h.percentile(p)
        assert got is not None
        assert exact <= got <= exact * (1 + 1 / 1024), (p, exact, got)
    assert h.max == max(values)


def test_bucket_bounds_cover_each_value_within_the_bound() -> None:
    rng = random.Random(3)
    for v in [*range(4200), *(rng.randrange(1 << 40) for _ in range(20000))]:
        low, high = bucket_bounds(bucket_index(v))
        assert low <= v <= high
        assert high - low <= v / 1024
    # adjacent buckets tile the range without gaps
    for i in range(EXACT_LIMIT - 2, EXACT_LIMIT + 3 * 1024):
        assert bucket_bounds(i)[1] + 1 == bucket_bounds(i + 1)[0]


def test_nearest_rank_definition_small_cases() -> None:
    h = Histogram()
    for v in (400, 100, 300, 200):
        h.record(v)
    # N=4: p50 → rank ceil(2.0)=2 → 200; p90 → ceil(3.6)=4 → 400; p25 → rank 1 → 100
    assert (h.percentile(50), h.percentile(90), h.percentile(25)) == (200, 400, 100)


def test_p999_uses_exact_rational_rank() -> None:
    h = Histogram()
    for v in range(1, 1001):
        h.record(v)
    # rank = ceil(99.9/100 * 1000) = 999 exactly; float arithmetic would give 1000
    assert h.percentile("99.9") == 999
    assert h.percentile(99.9) == 999
    assert h.summary()["p999"] == 999


def test_empty_summary_is_none_and_keys_are_the_contract() -> None:
    s = Histogram().summary()
    # the contract's keys, with two additions: p10 (the floor) and censored
    assert list(s) == ["count", "p10", "p50", "p90", "p99", "p999", "max", "censored"]
    assert s == {
        "count": 0,
        "p10": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "p999": None,
        "max": None,
        "censored": 0,
    }
    with pytest.raises(ValueError):
        Histogram().value_at_rank(1)


def test_censored_samples_count_and_show_in_buckets() -> None:
    h = Histogram()
    for v in (100, 200, 300):
        h.record(v)
    h.record(120_000_000, censored=True)  # a 120 s stall, still open
    s = h.summary()
    assert s["censored"] == 1 and s["max"] == 120_000_000
    assert s["p90"] is not None and s["p90"] >= 120_000_000 * 1023 // 1024
    censored = [b for b in h.buckets() if b.censored]
    assert len(censored) == 1 and censored[0].low <= 120_000_000 <= censored[0].high


def test_negative_is_clamped_to_zero() -> None:
    h = Histogram()
    h.record(-64)
    assert (h.min, h.max, h.percentile(50)) == (0, 0, 0)


def test_merge_equals_recording_everything() -> None:
    rng = random.Random(4)
    a, b, both = Histogram(), Histogram(), Histogram()
    for i in range(3000):
        v = int(10 ** rng.uniform(0, 8))
        cens = i % 97 == 0
        (a if i % 2 else b).record(v, censored=cens)
        both.record(v, censored=cens)
    a.merge(b)
    assert a.summary() == both.summary()
    assert list(a.buckets()) == list(both.buckets())
    assert (a.min, a.total) == (both.min, both.total)


def test_real_latencies_match_exact_percentiles() -> None:
    # not_present→ready of every token of the full stock-1 trace, matched naively by
    # token (exact list) vs the histogram
    np_ts: dict[int, int] = {}
    exact: list[int] = []
    h = Histogram()
    with parse.open_trace(TRACES / "stock-1-full.trace.xz") as f:
        for e in parse.iter_events(f):
            if e.kind is Kind.NOT_PRESENT:
                np_ts[e.token] = e.ts_us
            elif e.kind is Kind.READY and e.token in np_ts:
                lat = e.ts_us - np_ts.pop(e.token)
                exact.append(lat)
                h.record(lat)
    assert len(exact) == 16404
    for p in (50, 90, 99, 99.9):
        want = nearest_rank(exact, p)
        got = h.percentile(p)
        assert got is not None and want <= got <= want * (1 + 1 / 1024), (p, want, got)
    assert h.max == max(exact) == 293_781
