"""The trace reader's own loss knee: how many events a second it keeps, losing none.

The lab cannot push async PFs past ~22,000 a minute (the emulated L1 caps them), and
at that rate no trace buffer size loses events (``perf.loss_knee``).  So the capture
itself is pushed instead: a writer process writes ``trace_marker`` lines into a real
:class:`~apflab.host.tracefs.TraceSession` (the one every run uses, with its kvm
events enabled and its reader thread streaming each CPU's ``trace_pipe_raw`` pages to
a capture, as every run's does since the raw capture) at a set rate, and the
session's loss counters (overrun + dropped) say what it lost; the marker events in
its pages are counted as a cross-check.  Run where the runs trace: inside L1
(``apflab lab run -- apflab bench --trace-flood ...``; ``perf.reader_knee`` does).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.analysis import ringbuf
from apflab.host.tracefs import TraceSession
from apflab.process import run
from apflab.undo import UndoStack

#: the writer: RATE lines a second for SECONDS into trace_marker, in 10 ms steps;
#: prints how many it wrote and in how long
_WRITER = """
import os, sys, time
path, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
n, t0 = 0, time.monotonic()
while (now := time.monotonic() - t0) < seconds:
    due = int(rate * now)
    while n < due:
        os.write(fd, b"apflab flood")
        n += 1
    time.sleep(0.01)
print(n, time.monotonic() - t0)
"""

#: the text of the flood's marker events
FLOOD_TEXT = b"apflab flood"


def flood(rate: int, seconds: float, buffer_kb: int, work: Path) -> dict[str, Any]:
    """One flood: ``rate`` marker events/s for ``seconds`` into a fresh session."""
    name = paths.new_run_id("flood")
    out = work / f"{name}.trace.raw"
    with UndoStack(name) as undo:
        session = TraceSession(name, out, undo, buffer_kb=buffer_kb, raw=True)  # as runs do
        session.start()
        assert session.instance is not None
        marker = session.instance / "trace_marker"
        argv = [sys.executable, "-c", _WRITER, str(marker), str(rate), str(seconds)]
        writer = run(argv, timeout=seconds + 120)
        stats = session.stop()
    written, took = writer.stdout.split()
    seen = flood_markers(out)
    shutil.rmtree(out)
    return {
        "buffer_kb": buffer_kb,
        "rate": rate,
        "written": int(written),
        "written_per_s": round(int(written) / float(took)),
        "seen": seen,
        "lost": stats.lost,
        "overrun": stats.overrun,
        "dropped": stats.dropped,
    }


def flood_markers(capture: Path) -> int:
    """The flood's marker events in a raw capture (its pages decoded)."""
    formats, files = ringbuf.read_capture(capture)
    print_id = formats.id_of(ringbuf.PRINT_EVENT)
    seen = 0
    for path in files.values():
        data = ringbuf.read_pages(path)
        for _, type_id, start, end in ringbuf.page_events(data, formats):
            if type_id == print_id and FLOOD_TEXT in data[start:end]:
                seen += 1
    return seen


def lossy(row: dict[str, Any]) -> bool:
    """A flood lost events: by the session's counters, or missing from its file."""
    return bool(row["lost"]) or row["seen"] < row["written"]


def sweep(
    rates: list[int], buffers_kb: list[int], seconds: float, work: Path
) -> list[dict[str, Any]]:
    """For each buffer size, floods at rising rates until one loses events."""
    rows: list[dict[str, Any]] = []
    for kb in buffers_kb:
        for rate in rates:
            row = flood(rate, seconds, kb, work)
            rows.append(row)
            print(
                f"flood: {kb} KB/CPU, {row['written_per_s']:,} events/s: lost {row['lost']}"
                f" (seen {row['seen']:,} of {row['written']:,})",
                file=sys.stderr,
                flush=True,
            )
            if lossy(row):
                break
    return rows


def knee(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per buffer: the top lossless rate and the first lossy one (events/s)."""
    out: dict[int, dict[str, Any]] = {}
    for kb in dict.fromkeys(r["buffer_kb"] for r in rows):
        mine = [r for r in rows if r["buffer_kb"] == kb]
        ok = [r["written_per_s"] for r in mine if not lossy(r)]
        bad = [r["written_per_s"] for r in mine if lossy(r)]
        out[kb] = {
            "top_lossless_events_per_s": max(ok, default=None),
            "first_lossy_events_per_s": min(bad, default=None),
        }
    return out
