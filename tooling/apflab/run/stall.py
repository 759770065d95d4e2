"""Live stall detection: a token outstanding past its bound while the trace streams.

A guest whose ACK is broken stops getting page-readies for good (lab notes 5b):
its workload would then sit until the deadline.  :class:`StallWatch` follows the
trace file as the tracer writes it, feeds the events to a
:class:`~apflab.analysis.analyzer.LiveAnalysis` and raises :class:`Stalled` as soon
as a token has been outstanding longer than the stall bound, so a broken kernel
costs seconds, not the whole deadline.  The trace clock's "now" comes from a
``trace_marker`` line written at every poll (the guest may be silent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from apflab.analysis.analyzer import LiveAnalysis
from apflab.analysis.parse import iter_events

log = logging.getLogger(__name__)


class Stalled(Exception):
    """A token has been outstanding longer than the stall bound."""


class StallWatch:
    """Polled about once a second while the workload runs (the SSH ``watch`` hook).

    :param trace: the file the tracer streams to
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
        self.stall_us = int(stall_s * 1_000_000)
        self._live = LiveAnalysis(vcpu_of_pid)
        self._offset = 0
        self._partial = b""
        self.found: str | None = None

    def poll(self) -> None:
        """Read what the tracer wrote since the last poll; raise :class:`Stalled`."""
        self.mark("apflab: stall check")
        try:
            with self.trace.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        self._live.feed(iter_events(line.decode(errors="replace") for line in lines))
        oldest = self._live.oldest_outstanding()
        if oldest is not None and oldest.age_us > self.stall_us:
            where = f"vCPU {oldest.vcpu}" if oldest.vcpu is not None else f"pid {oldest.pid}"
            self.found = (
                f"token {oldest.token:#x} on {where} outstanding for "
                f"{oldest.age_us / 1e6:.1f} s (bound {self.stall_us / 1e6:g} s)"
            )
            log.warning("stall: %s: stopping the workload", self.found)
            raise Stalled(self.found)
