"""Events → the life of every async-PF token: latencies, ACKs, invariants.

:func:`analyze` consumes a stream of :class:`~apflab.analysis.parse.Event` once,
in trace order.  Its memory is bounded by what is *outstanding* (tokens not yet
readied, readies not yet ACKed, completions waiting for their ready), never by
the number of events: latencies go into :class:`~apflab.analysis.stats.Histogram`
s and the outstanding-APF timeline into a bounded number of bins.

This module only routes each event to the code of its concern:

* :mod:`~apflab.analysis.tokens` — a token's life: not_present → completed →
  ready, the gva matching of completions, the wake-all flush;
* :mod:`~apflab.analysis.acks` — interrupt or halt path (the #PF injection),
  ACK matching, the ordering quirk, back-to-back readies, the heuristic;
* :mod:`~apflab.analysis.classify` — which classification the trace allows;
* :mod:`~apflab.analysis.timeline`, :mod:`~apflab.analysis.summary`,
  :mod:`~apflab.analysis.invariants` — what the result is made of.

**Censoring:** at the end of observation (``end_ts_us``, else the last event)
tokens still outstanding and interrupt-delivered readies never ACKed enter their
latency with their age as a *censored* sample.  A stall therefore shows as a
long tail, never as a fast median.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Final

from apflab.analysis import ringbuf
from apflab.analysis.acks import AckMatcher
from apflab.analysis.classify import AUTO, choose_classification
from apflab.analysis.invariants import check_invariants
from apflab.analysis.model import (
    CLASSIFICATION_HEURISTIC,
    CLASSIFICATION_PF,
    Analysis,
    OutstandingToken,
)
from apflab.analysis.parse import WAKE_ALL_TOKEN, Event, Kind, ParseStats, iter_events, open_trace
from apflab.analysis.state import Delivery, VcpuState
from apflab.analysis.summary import event_counts, vcpus_in_order
from apflab.analysis.timeline import TimelineBuilder
from apflab.analysis.tokens import CompletionMatcher, TokenTracker
from apflab.errors import AnalysisError

_READY: Final = Kind.READY
_COMPLETED: Final = Kind.COMPLETED
_ACK: Final = Kind.ACK
_PF: Final = Kind.PF
_PF_RE: Final = Kind.PF_REINJECTED
_MARKER: Final = Kind.MARKER
_Handler = Callable[[VcpuState, int, int, int], None]


class _Analyzer:
    """One pass over the events: :meth:`feed` each in order, then :meth:`finish`."""

    def __init__(
        self,
        vcpu_of_pid: Mapping[int, int] | None,
        grace_us: int,
        completion_window_us: int,
        max_bins: int,
        initial_bin_us: int,
    ) -> None:
        self.vcpu_of_pid = vcpu_of_pid
        self.grace_us = grace_us
        self.classification = CLASSIFICATION_PF
        self.heuristic = False  # the classification is the heuristic (no #PF events)
        self.classification_detail = ""
        self.start_us: int | None = None
        self.last_us: int | None = None
        self.foreign = 0
        self.markers = 0
        self.examples: dict[str, list[str]] = {}
        self.vcpus: dict[int, VcpuState] = {}
        self.completions = CompletionMatcher(completion_window_us)
        self.tokens = TokenTracker(self.vcpus, self.completions, self.examples)
        self.acks = AckMatcher(self.examples, replay=self._step)
        self.timeline = TimelineBuilder(max_bins, initial_bin_us)
        # what _step does per event kind (a Kind is its index in the list)
        handlers: dict[Kind, _Handler] = {
            Kind.NOT_PRESENT: self._on_not_present,
            Kind.READY: self._on_ready,
            Kind.ACK: self._on_ack,
            Kind.PF: self._on_orphan_pf,
            Kind.PF_REINJECTED: self._on_reinjected_pf,
            Kind.TRY_GET_PAGE: self._on_try_get_page,
            Kind.REPEATED_FAULT: self._on_repeated_fault,
        }
        self._handlers = [handlers.get(Kind(i), self._on_other) for i in range(len(Kind))]

    def use_classification(self, method: str, detail: str) -> None:
        self.classification = method
        self.classification_detail = detail
        self.heuristic = self.acks.heuristic = method == CLASSIFICATION_HEURISTIC

    def _vcpu(self, pid: int) -> VcpuState | None:
        """The state of thread ``pid``, created on its first event; None: not a vCPU."""
        if self.vcpu_of_pid is None:
            index = None
        else:
            index = self.vcpu_of_pid.get(pid)
            if index is None:
                return None
        vcpu = self.vcpus[pid] = VcpuState(pid, index, self.timeline.new_series())
        return vcpu

    # -- the events -------------------------------------------------------------
    def feed(self, event: Event) -> None:
        ts, pid, _cpu, kind, token, gva = event
        if self.start_us is None:
            self.start_us = self.timeline.t0_us = ts
        if self.last_us is None or ts > self.last_us:
            self.last_us = ts
        if kind is _COMPLETED:
            self.completions.on_completed(ts, gva)
            return
        if kind is _MARKER:
            self.markers += 1
            return
        vcpu = self.vcpus.get(pid) or self._vcpu(pid)
        if vcpu is None:
            self.foreign += 1
            return
        if vcpu.unclassified is not None:
            # its last not_present awaits its class (see acks.py): a ready or a
            # reinjected #PF waits, anything else settles it (the held events are
            # then replayed through _step)
            if kind is _READY or kind is _PF_RE:
                vcpu.held_back.append(event)
                return
            if kind is _PF:
                self.acks.on_injected_pf(vcpu, ts)
                return
            self.acks.classify(vcpu, Delivery.HALT)  # the guest ran without the #PF
        # as _step (inlined: once per event)
        if vcpu.maybe_back_to_back is not None:
            self.acks.decide_back_to_back(vcpu, ts, kind is _ACK)
        self._handlers[kind](vcpu, ts, token, gva)

    def _step(self, vcpu: VcpuState, event: Event) -> None:
        """Process ``event`` of ``vcpu``, whose last not_present has its class."""
        ts, _pid, _cpu, kind, token, gva = event
        if vcpu.maybe_back_to_back is not None:
            self.acks.decide_back_to_back(vcpu, ts, kind is _ACK)
        self._handlers[kind](vcpu, ts, token, gva)

    def _on_not_present(self, vcpu: VcpuState, ts: int, token: int, gva: int) -> None:
        if self.heuristic and vcpu.awaiting_ack:
            self.acks.guest_ran_again(vcpu)
        started = self.tokens.on_not_present(vcpu, ts, token, gva)
        self.timeline.record(vcpu.series, ts, len(vcpu.outstanding))
        if not self.heuristic:
            vcpu.unclassified = started
        vcpu.ready_right_before_us = None

    def _on_ready(self, vcpu: VcpuState, ts: int, token: int, _gva: int) -> None:
        if token == WAKE_ALL_TOKEN:
            if self.tokens.on_wake_all(vcpu):
                self.timeline.record(vcpu.series, ts, 0)
            self.acks.on_wake_all(vcpu, ts)
            return
        ended = self.tokens.on_ready(vcpu, ts, token)
        if ended is None:
            vcpu.ready_right_before_us = None
            return
        self.timeline.record(vcpu.series, ts, len(vcpu.outstanding))
        self.timeline.record_peak(self.timeline.ready_latency, ts, ts - ended.not_present_us)
        self.acks.on_ready(vcpu, ts, ended)

    def _on_ack(self, vcpu: VcpuState, ts: int, _token: int, _gva: int) -> None:
        self.acks.on_ack(vcpu, ts)

    def _on_orphan_pf(self, vcpu: VcpuState, _ts: int, _token: int, _gva: int) -> None:
        """A #PF with no not_present before it (not an async PF's)."""
        vcpu.stats.pf_orphan += 1
        vcpu.ready_right_before_us = None

    def _on_reinjected_pf(self, vcpu: VcpuState, _ts: int, _token: int, _gva: int) -> None:
        vcpu.stats.pf_reinjected += 1

    def _on_try_get_page(self, vcpu: VcpuState, _ts: int, _token: int, _gva: int) -> None:
        if self.heuristic and vcpu.awaiting_ack:
            self.acks.guest_ran_again(vcpu)
        vcpu.stats.try_get_page += 1
        vcpu.ready_right_before_us = None

    def _on_repeated_fault(self, vcpu: VcpuState, _ts: int, _token: int, _gva: int) -> None:
        if self.heuristic and vcpu.awaiting_ack:
            self.acks.guest_ran_again(vcpu)
        vcpu.stats.repeated_fault += 1
        vcpu.ready_right_before_us = None

    def _on_other(self, vcpu: VcpuState, ts: int, token: int, gva: int) -> None:
        raise AssertionError("completions and markers are handled in feed()")

    # -- the end ------------------------------------------------------------------
    def finish(self, end_ts_us: int | None) -> Analysis:
        end = end_ts_us if end_ts_us is not None else self.last_us
        vcpus = self.vcpus.values()
        for vcpu in vcpus:
            if vcpu.unclassified is not None:
                # no guest entry on this vCPU after its last not_present was observed:
                # no #PF was delivered, so no ACK can be expected (a token it left
                # outstanding is censored whatever its class)
                vcpu.stats.unresolved_at_end += 1
                self.acks.classify(vcpu, Delivery.HALT)
            if vcpu.maybe_back_to_back is not None:
                # no ACK line followed before the end: a back-to-back ready
                self.acks.decide_back_to_back(vcpu, end or 0, is_ack=False)
        if self.heuristic:
            self.acks.finish_heuristic(vcpus)
        self.completions.finish()
        outstanding = self.tokens.censor(vcpus, end)
        unacked = self.acks.censor(vcpus, end)
        stats = vcpus_in_order(v.stats for v in vcpus)
        counted = {id(s) for s in stats}
        analysis = Analysis(
            events=event_counts(
                stats,
                heuristic=self.heuristic,
                completions=self.completions,
                outstanding_at_end=len(outstanding),
                unacked_at_end=len(unacked),
                foreign=self.foreign,
                markers=self.markers,
            ),
            latency={
                "not_present_to_ready": self.tokens.not_present_to_ready,
                "completed_to_ready": self.completions.completed_to_ready,
                "ready_to_ack": self.acks.ready_to_ack,
                "back_to_back_gap": self.acks.back_to_back_gap,
                "queued_completed_to_ready": self.acks.queued_completed_to_ready,
            },
            invariants={},
            vcpus=stats,
            timeline=self.timeline.build(
                ((v.stats.label, v.series) for v in vcpus if id(v.stats) in counted), end
            ),
            outstanding_at_end=outstanding,
            unacked_at_end=unacked,
            classification=self.classification,
            classification_detail=self.classification_detail,
            vcpu_ids="map" if self.vcpu_of_pid is not None else "inferred",
            start_us=self.start_us,
            end_us=end,
            grace_us=self.grace_us,
            halt_path_latency=self.acks.halt_path_latency,
            ack_triggered_lead=self.acks.ack_triggered_lead,
            examples=self.examples,
        )
        analysis.invariants = check_invariants(analysis)
        return analysis


def analyze(
    events: Iterable[Event],
    vcpu_of_pid: Mapping[int, int] | None = None,
    end_ts_us: int | None = None,
    *,
    grace_us: int = 1_000_000,
    classification: str = AUTO,
    completion_window_us: int = 1_000_000,
    max_timeline_bins: int = 512,
    initial_bin_us: int = 1_000,
) -> Analysis:
    """Follow every async-PF token through the trace (see the module doc).

    :param events: parsed events in trace order (:func:`~apflab.analysis.parse.iter_events`)
    :param vcpu_of_pid: vCPU thread id → vCPU index (QMP ``query-cpus-fast``); only
        these threads count.  None: every thread that logs not_present/ready/ACK is
        a vCPU and its id is inferred from ``token & 0xfff`` (said so in
        ``token_vcpu_id_matches``)
    :param end_ts_us: end of observation on the trace clock (when tracing stopped);
        default: the last event.  Censored ages are measured up to it, so pass it
        whenever known (a ``trace_marker`` line at stop does it too)
    :param grace_us: a token outstanding (or a ready un-ACKed) at the end for longer
        than this breaks its invariant; younger ones are censored samples only
    :param classification: ``"auto"`` (the #PF injection when the trace has it, else
        the heuristic), ``"pf"`` or ``"heuristic"``
    :param completion_window_us: a ready whose ``completed`` has not come within
        this time is counted in ``ready_without_completed`` and forgotten
    :param max_timeline_bins: points per vCPU in :attr:`Analysis.timeline`
    :param initial_bin_us: first timeline bin width (doubled as needed)
    :raises ValueError: ``classification`` is none of those
    """
    analyzer = _Analyzer(
        vcpu_of_pid, grace_us, completion_window_us, max_timeline_bins, initial_bin_us
    )
    method, detail, stream = choose_classification(classification, events, analyzer.feed)
    analyzer.use_classification(method, detail)
    feed = analyzer.feed
    for event in stream:
        feed(event)
    return analyzer.finish(end_ts_us)


class LiveAnalysis:
    """The analysis of a trace still being written: feed events as they come and ask
    how long the oldest token has been outstanding (live stall detection).

    The trace must hold the ``kvm_inj_exception`` #PF events (apflab's tracer
    enables them), so no look-ahead is needed to classify.
    """

    def __init__(self, vcpu_of_pid: Mapping[int, int] | None = None) -> None:
        self._analyzer = _Analyzer(vcpu_of_pid, 1_000_000, 1_000_000, 512, 1_000)
        self._analyzer.use_classification(
            CLASSIFICATION_PF, "interrupt/halt path from the #PF injection"
        )

    def feed(self, events: Iterable[Event]) -> None:
        feed = self._analyzer.feed
        for event in events:
            feed(event)

    @property
    def now_us(self) -> int | None:
        """The newest timestamp seen (a trace marker written now makes it "now")."""
        return self._analyzer.last_us

    def oldest_outstanding(self) -> OutstandingToken | None:
        """The token outstanding longest (its age up to :attr:`now_us`), if any."""
        now = self.now_us
        oldest: OutstandingToken | None = None
        for vcpu in self._analyzer.vcpus.values():
            for t in vcpu.outstanding.values():
                if oldest is None or t.not_present_us < oldest.since_us:
                    age = max(0, (now or t.not_present_us) - t.not_present_us)
                    stats = vcpu.stats
                    completed = t.completed_us is not None
                    oldest = OutstandingToken(
                        stats.vcpu, stats.pid, t.token, t.gva, t.not_present_us, age, completed
                    )
        return oldest


def iter_trace_events(path: str | Path, stats: ParseStats) -> Iterator[Event]:
    """The events of a trace file (plain, ``.xz`` or ``.gz``) or of a raw capture
    directory, in time order; ``stats`` counts what was read."""
    if ringbuf.is_capture(Path(path)):
        yield from ringbuf.iter_raw_events(Path(path), stats)
        return
    with open_trace(path) as f:
        yield from iter_events(f, stats)


def analyze_trace(
    path: str | Path,
    vcpu_of_pid: Mapping[int, int] | None = None,
    *,
    grace_us: int = 1_000_000,
) -> tuple[Analysis, ParseStats]:
    """Read, parse and analyse a trace file (plain, ``.xz`` or ``.gz``) or a raw
    capture directory (:mod:`~apflab.analysis.ringbuf`).

    The end of observation is the last event (a ``trace_marker`` line written
    when tracing stopped makes it the true end).

    :param path: the trace (:func:`~apflab.analysis.parse.open_trace`)
    :param vcpu_of_pid: as for :func:`analyze`
    :param grace_us: as for :func:`analyze`
    :returns: the analysis and what the parser counted (header, unparsed and
        malformed lines)
    :raises AnalysisError: the trace cannot be opened or read to its end (a
        truncated or corrupt ``.xz``/``.gz``, a directory)
    """
    stats = ParseStats()
    try:
        analysis = analyze(iter_trace_events(path, stats), vcpu_of_pid, grace_us=grace_us)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
        raise AnalysisError(
            f"cannot read trace {path} to its end ({err or type(err).__name__}): "
            "truncated or corrupt?"
        ) from err
    return analysis, stats
