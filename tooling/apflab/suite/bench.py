"""Analyzer benchmark: how many events per second parse and parse+analyze handle.

:func:`bench_analyzer` reads the trace into memory once (so disk and
decompression are timed apart), then times, ``repeat`` times each, the parser
alone and the parser feeding :func:`~apflab.analysis.analyzer.analyze`; the best
run of each is reported (the least disturbed by other load).  It prints nothing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.analysis import native, parse, ringbuf
from apflab.analysis.analyzer import analyze
from apflab.errors import AnalysisError, UsageError

#: Where a default benchmark trace is looked for, relative to the source checkout.
DEFAULT_TRACE = Path("tests/unit/fixtures/traces/stock-1-full.trace.xz")
#: A raw capture (the format every run keeps since the raw reader), same checkout.
DEFAULT_RAW = Path("tests/unit/fixtures/traces/record-1/trace.raw")


def default_trace() -> Path:
    """The full real trace shipped with the unit-test fixtures.

    :raises UsageError: not running from a source checkout that has it
    """
    root = paths.repo_root()
    if root is None or not (root / DEFAULT_TRACE).is_file():
        raise UsageError(f"no default trace ({DEFAULT_TRACE} in a source checkout): pass one")
    return root / DEFAULT_TRACE


_Source = Callable[[parse.ParseStats | None], Iterator[parse.Event]]


def _read_into_memory(path: Path) -> tuple[_Source, int]:
    """The trace read once (disk and decompression timed apart): the events' source
    and its size (lines of text, or bytes of ring-buffer pages)."""
    if ringbuf.is_capture(path):
        formats, files = ringbuf.read_capture(path)
        pages = {cpu: ringbuf.read_pages(p) for cpu, p in files.items()}
        return (lambda st: ringbuf.decode(formats, pages, st)), sum(map(len, pages.values()))
    with parse.open_trace(path) as f:
        try:
            lines = f.readlines()
        except OSError as err:
            raise AnalysisError(f"cannot read trace {path}: {err}") from err
    return (lambda st: parse.iter_events(lines, st)), len(lines)


def bench_analyzer(trace_path: str | Path, repeat: int = 3) -> dict[str, Any]:
    """Measure the analyzer on one trace.

    :param trace_path: a trace file (plain, ``.xz`` or ``.gz``) or a raw capture
    :param repeat: timed runs of each stage (the best is reported)
    :returns: ``{"trace", "lines", "events", "repeat", "read_s", "parse_s",
        "parse_events_per_s", "analyze_s", "analyze_events_per_s",
        "analyze_only_events_per_s", "code"}`` — ``analyze_s`` is parse+analyze,
        ``analyze_only_events_per_s`` the analysis alone on pre-parsed events, ``code``
        whether the analyzer ran compiled (:data:`apflab.analysis.native.mode`)
    :raises AnalysisError: the trace cannot be read or has no events
    """
    if repeat < 1:
        raise UsageError(f"repeat must be >= 1, not {repeat}")
    t0 = time.perf_counter()
    source, size = _read_into_memory(Path(trace_path))
    read_s = time.perf_counter() - t0
    parse_best = analyze_best = only_best = float("inf")
    events = 0
    for _ in range(repeat):
        t = time.perf_counter()
        st = parse.ParseStats()
        deque(source(st), maxlen=0)
        parse_best = min(parse_best, time.perf_counter() - t)
        events = st.events
        t = time.perf_counter()
        analyze(source(None))
        analyze_best = min(analyze_best, time.perf_counter() - t)
    if events == 0:
        raise AnalysisError(f"{trace_path}: no async-PF events to benchmark on")
    parsed = list(source(None))
    for _ in range(repeat):
        t = time.perf_counter()
        analyze(parsed)
        only_best = min(only_best, time.perf_counter() - t)
    return {
        "trace": str(trace_path),
        "format": "raw" if ringbuf.is_capture(Path(trace_path)) else "text",
        "lines": size,
        "events": events,
        "repeat": repeat,
        "read_s": round(read_s, 4),
        "parse_s": round(parse_best, 4),
        "parse_events_per_s": int(events / parse_best),
        "analyze_s": round(analyze_best, 4),
        "analyze_events_per_s": int(events / analyze_best),
        "analyze_only_events_per_s": int(events / only_best),
        "code": native.mode,
    }
