"""What the guest felt: its own touch latencies, from apflab-memtouch's report.

The workload times every page touch on the guest's clock and reports, per
(process, round), a log2 histogram of touch latencies and the touches of 1 ms or
more ("stalls") with their start (guest_images/workload/apflab-memtouch.c).  This
is the guest's view of the same events the host traces: an async PF the guest
waited for shows up as a slow touch.  Placed on the trace clock by the
``workload start`` marker the runner writes as the workload starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: the trace marker the runner writes as the workload starts: the guest's timings
#: (apflab-memtouch's clock, which starts with it) are placed on the trace clock by it
WORKLOAD_START = "apflab: workload start"
#: the histogram's buckets: [2^b, 2^(b+1)) µs, b = 0 .. 24 (b = 0: under 2 µs)
BUCKETS = 25
_PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))


@dataclass
class GuestView:
    """The guest's touch latencies over the whole workload.

    :ivar hist_log2_us: touches per log2 bucket (see :data:`BUCKETS`)
    :ivar stalls: ``(seconds since the workload started, µs)`` of each touch of 1 ms
        or more, in time order
    :ivar start_us: the workload's start on the trace clock (None: unknown)
    """

    touches: int = 0
    slow_touches: int = 0
    max_us: int = 0
    hist_log2_us: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    stalls: list[tuple[float, int]] = field(default_factory=list)
    stalls_dropped: int = 0
    start_us: int | None = None

    def percentile(self, q: float) -> int | None:
        """An upper bound of the q-quantile touch latency (its bucket's top), µs."""
        total = sum(self.hist_log2_us)
        if total == 0:
            return None
        need = q * total
        seen = 0
        for b, n in enumerate(self.hist_log2_us):
            seen += n
            if seen >= need:
                return min(2 ** (b + 1), self.max_us) if b < BUCKETS - 1 else self.max_us
        return self.max_us

    def summary(self) -> dict[str, Any]:
        """verdict.json's ``guest_view`` (the stall list stays in workload.jsonl)."""
        out: dict[str, Any] = {
            "touches": self.touches,
            "slow_touches_over_100us": self.slow_touches,
        }
        out["touch_us"] = {k: self.percentile(q) for k, q in _PERCENTILES} | {"max": self.max_us}
        out["stalls_1ms"] = len(self.stalls) + self.stalls_dropped
        out["longest_stall_us"] = max((us for _, us in self.stalls), default=None)
        out["workload_start_trace_us"] = self.start_us
        return out


def guest_view(rounds: Iterable[Mapping[str, Any]], start_us: int | None = None) -> GuestView:
    """Merge apflab-memtouch's per-(process, round) lines into one :class:`GuestView`.

    Lines from an older workload (no histogram) count their touches and maxima only.
    """
    view = GuestView(start_us=start_us)
    for r in rounds:
        view.touches += int(r.get("pages", 0))
        view.slow_touches += int(r.get("slow_touches", 0))
        view.max_us = max(view.max_us, int(r.get("max_touch_us", 0)))
        for b, n in enumerate(r.get("hist_log2_us", ())[:BUCKETS]):
            view.hist_log2_us[b] += int(n)
        view.stalls += [(float(t) / 1000, int(us)) for t, us in r.get("stalls", ())]
        view.stalls_dropped += int(r.get("stalls_dropped", 0))
    view.stalls.sort()
    return view
