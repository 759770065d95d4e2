"""Live stall detection: a token outstanding past its bound while the trace streams.

A guest whose ACK is broken stops getting page-readies for good (lab notes 5b):
its workload would then sit until the deadline.  :class:`StallWatch` follows the
trace file as the tracer writes it and raises :class:`Stalled` as soon as a token
has been outstanding longer than the stall bound, so a broken kernel costs seconds,
not the whole deadline.  The trace clock's "now" comes from a ``trace_marker`` line
written at every poll (the guest may be silent).

It must cost next to nothing, because it runs beside the guest: in the nested lab on
L1's one emulated vCPU, where parsing and analysing every event as it came (the first
design) took ~10 s of a 60 s workload, most of the tracer's overhead (make bench's
``record`` runs, docs/performance.md).  So each poll only *counts* the not_present
and ready lines of the new text (``bytes.count``, no parsing), keeping a lower bound
on the tokens outstanding, and the time since a page-ready last came while some
were.  Only when that time passes the bound does it analyse the whole trace once
(:class:`~apflab.analysis.analyzer.LiveAnalysis`) to confirm the stall and name the
oldest token, so it raises exactly when the analysis of the trace says so.

With a raw capture (:mod:`apflab.analysis.ringbuf`) the reader thread hands each
CPU's new pages to :meth:`StallWatch.feed_pages` and each poll counts the events
in them (:func:`~apflab.analysis.ringbuf.count`: headers and type ids only); the
confirmation decodes the capture so far.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from apflab.analysis import ringbuf
from apflab.analysis.analyzer import LiveAnalysis
from apflab.analysis.parse import iter_events, open_trace, parse_line

log = logging.getLogger(__name__)

_NOT_PRESENT = b": kvm_async_pf_not_present: "
_READY = b": kvm_async_pf_ready: "
_WAKE_ALL = b": kvm_async_pf_ready: token 0xffffffff "


class Stalled(Exception):
    """A token has been outstanding longer than the stall bound."""


class StallWatch:
    """Polled about once a second while the workload runs (the SSH ``watch`` hook).

    :param trace: the file the tracer streams to, or its raw capture directory
        (then the pages come through :meth:`feed_pages`)
    :param mark: writes a line into the trace now
        (:meth:`apflab.host.tracefs.TraceSession.mark`)
    :param stall_s: the bound (:attr:`apflab.analysis.thresholds.Thresholds.stall_s`)
    """

    def __init__(
        self,
        trace: Path,
        mark: Callable[[str], None],
        vcpu_of_pid: Mapping[int, int] | None,
        stall_s: float,
    ) -> None:
        self.trace, self.mark = trace, mark
        self.vcpu_of_pid = vcpu_of_pid
        self.stall_us = int(stall_s * 1_000_000)
        self._offset = 0
        self._partial = b""
        #: a lower bound on the tokens outstanding: each ready takes away at most one,
        #: a wake-all at most all (of its vCPU), and a ready of a token from before the
        #: trace began none, so the count, floored at 0, never exceeds the truth
        self._outstanding = 0
        #: trace time (µs) since when tokens have been outstanding with no page-ready:
        #: the tokens counted then are all still outstanding, so at least this old
        self._since_us: int | None = None
        self.confirmations = 0  # full analyses run (once per suspected stall)
        self.found: str | None = None
        self.raw = ringbuf.is_capture(trace)
        self._formats = ringbuf.read_capture(trace)[0] if self.raw else None
        self._pages: list[bytes] = []
        self._lock = threading.Lock()

    def feed_pages(self, cpu: int, pages: bytes) -> None:
        """New pages of a raw capture (called from the trace reader's thread)."""
        with self._lock:
            self._pages.append(pages)

    def poll(self) -> None:
        """Count what the tracer wrote since the last poll; raise :class:`Stalled`."""
        self.mark("apflab: stall check")
        if self._formats is not None:
            with self._lock:
                pages, self._pages = self._pages, []
            c = ringbuf.count(pages, self._formats)
            if c.last_ts_us is not None:
                self._step(c.last_ts_us, c.not_present, c.ready, c.after_wake_all)
            return
        try:
            with self.trace.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        text = self._partial + data
        end = text.rfind(b"\n") + 1
        self._partial = text[end:]
        chunk = text[:end]
        now = _last_ts_us(chunk)
        if now is None:
            return
        wake = chunk.rfind(_WAKE_ALL)
        tail = chunk[wake + 1 :] if wake >= 0 else b""
        self._step(
            now,
            chunk.count(_NOT_PRESENT),
            chunk.count(_READY),
            (tail.count(_NOT_PRESENT), tail.count(_READY)) if wake >= 0 else None,
        )

    def _step(
        self, now: int, not_present: int, readies: int, after_wake_all: tuple[int, int] | None
    ) -> None:
        """The new events' counts (and those after a wake-all among them) → the bound."""
        if after_wake_all is not None:  # what a wake-all left: the tokens announced after it
            outstanding = after_wake_all[0] - after_wake_all[1]
        else:
            outstanding = self._outstanding + not_present - readies
        self._outstanding = max(0, outstanding)
        if readies or not self._outstanding:
            self._since_us = None
        if self._outstanding and self._since_us is None:
            self._since_us = now
        if self._since_us is not None and now - self._since_us > self.stall_us:
            self._confirm(now)

    def _confirm(self, now_us: int) -> None:
        """The whole trace analysed once: raise :class:`Stalled` if its oldest token is
        older than the bound; otherwise count from now again."""
        self.confirmations += 1
        live = LiveAnalysis(self.vcpu_of_pid)
        if self.raw:
            live.feed(ringbuf.iter_raw_events(self.trace))
        else:
            with open_trace(self.trace) as f:
                live.feed(iter_events(f))
        oldest = live.oldest_outstanding()
        if oldest is None or oldest.age_us <= self.stall_us:
            self._since_us = now_us
            return
        where = f"vCPU {oldest.vcpu}" if oldest.vcpu is not None else f"pid {oldest.pid}"
        self.found = (
            f"token {oldest.token:#x} on {where} outstanding for "
            f"{oldest.age_us / 1e6:.1f} s (bound {self.stall_us / 1e6:g} s)"
        )
        log.warning("stall: %s: stopping the workload", self.found)
        raise Stalled(self.found)


def _last_ts_us(chunk: bytes) -> int | None:
    """The trace time of the last event line of ``chunk`` (a marker, usually)."""
    start = len(chunk)
    for _ in range(16):  # a few lines back at most: other lines have no event we know
        if start <= 0:
            return None
        nl = chunk.rfind(b"\n", 0, start - 1)
        line = chunk[nl + 1 : start].decode(errors="replace")
        start = nl + 1
        try:
            ev = parse_line(line)
        except ValueError:
            ev = None
        if ev is not None:
            return ev.ts_us
    return None
