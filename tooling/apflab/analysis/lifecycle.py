"""Events → the life of every async-PF token: latencies, ACKs, invariants.

:func:`analyze` consumes a stream of :class:`~apflab.analysis.parse.Event` once,
in trace order.  Its memory is bounded by what is *outstanding* (tokens not yet
readied, readies not yet ACKed, completions waiting for their ready), never by
the number of events: latencies go into :class:`~apflab.analysis.stats.Histogram`
s and the outstanding-APF timeline into a bounded number of bins.

What a token's life looks like in a 6.1 host (``arch/x86/kvm/x86.c``,
``virt/kvm/async_pf.c``), and how it is measured here:

* ``kvm_async_pf_not_present`` (vCPU thread) starts a token.  If KVM could inject
  the "page not present" #PF, the next guest entry on that vCPU logs
  ``kvm_inj_exception: #PF`` (not ``[reinjected]``) — possibly after some
  ``kvm_async_pf_ready`` lines that the same entry dequeued first, even the
  token's own.  Such a token is **interrupt-path**: its page-ready is delivered
  as an interrupt and the guest ACKs it (``kvm_msr: msr_write 4b564d07``).
  Without the #PF (kernel-mode fault, interrupts off...) KVM halts the vCPU
  instead: **halt-path**, whose ready gets no interrupt and no ACK.  The class of
  a not_present is settled by the next event on its vCPU: a #PF → interrupt; a
  not_present, ACK, ``kvm_try_async_get_page`` or repeated fault (the guest ran
  without taking the #PF) → halt.  Readies logged in between wait until then.
* ``kvm_async_pf_completed`` (kworker, no token) is matched to its token by
  ``gva`` (first outstanding token with that gva); it is emitted *after* the
  work is queued, so it may come after the ready: either order is accepted
  (completed→ready is then recorded as 0 and counted in
  ``completed_after_ready``).
* ``kvm_async_pf_ready`` ends a token: not_present→ready latency.  Token
  ``0xffffffff`` is a wake-all broadcast (sent when the guest (re)enables async
  PF; the disable before it flushed that vCPU's queue without readies): counted
  apart, interrupt-delivered, and the tokens still outstanding on that vCPU are
  counted as *flushed*, not as lost.
* ACK: each ACK belongs to the oldest interrupt-delivered ready on its vCPU not
  yet ACKed (ready→ACK latency).  **Ordering quirk:** ``kvm_msr`` is logged after
  KVM handled the write, and handling it dequeues the next ready — so a ready
  *triggered by* an ACK is logged just before that ACK's line.  A ready that
  arrives while an older interrupt-delivered ready is un-ACKed, and whose next
  event on the vCPU is an ACK, is therefore counted as *ACK-triggered*, not as
  back-to-back; only one whose next event is something else is a genuine
  **back-to-back** ready (``back_to_back_gap`` = time since the previous un-ACKed
  interrupt-delivered ready).
* **Censoring:** at the end of observation (``end_ts_us``, else the last event)
  tokens still outstanding enter not_present→ready (and completed→ready when
  their completion was seen) with their age as a *censored* sample, and
  interrupt-delivered readies never ACKed enter ready→ACK the same way.  A stall
  therefore shows as a long tail, never as a fast median.

Without any ``kvm_inj_exception`` #PF event (tracing without that event) the
class cannot be read from the trace: a documented heuristic is used instead
(see :data:`CLASSIFICATION_HEURISTIC`) and the result says so.

**Measured on the real captures** (nested lab, 6.1 host; stock = Debian 6.1
cloud kernel L2 with 2 vCPUs, tiny = tinyconfig 6.1 L2 with 1 vCPU):

=============  ======  ==========  =========  ======  =============  ============  ==========
capture        not_    interrupt-  halt-path  ACKs    ACK-triggered  ready line →  genuine
               present path (#PF)                     readies        ACK line      back-to-back
=============  ======  ==========  =========  ======  =============  ============  ==========
stock-1        16,404  15,992      412        15,994  813 (5.1 %)    p50 16 µs,    0
                                                                     max 186 µs
stock-2        15,100  14,794      306        14,796  816 (5.5 %)    p50 20 µs,    0
                                                                     max 1.9 ms
tiny-good-1    12,478  12,330      148        12,331  419 (3.4 %)    p50 21 µs,    0
                                                                     max 211 µs
tiny-good-      11,233  11,039      194        11,040  750 (6.8 %)    p50 22 µs,    0
idle-1                                                               max 764 µs
tiny-noack-1   66      64          2          0       0              —             61 of 61
tiny-noack-2   33      32          1          0       0              —             29 of 29
=============  ======  ==========  =========  ======  =============  ============  ==========

(ACKs = interrupt-path readies + the wake-alls; "ACK-triggered" as a share of
interrupt-delivered readies.)  The #PF classification agrees exactly with the
count of non-reinjected #PF injections (every one follows a not_present; the
capture helper's independent count for stock-1 is 15,992 / 412).  A naive count
of "a ready with no ACK since the previous ready" finds 1,223 back-to-back readies
in stock-1 (7.5 % — the lab notes' "~4 %" is the same effect): 813 are the ordering
quirk and 410 follow a halt-path ready (which expects no ACK).  **No genuine
back-to-back ready occurs in a healthy run**, and none can: KVM dequeues a
page-ready only while the guest's token slot is free
(``kvm_arch_can_dequeue_async_page_present``), the guest frees it in the
interrupt handler right before the ACK ``wrmsr``, and the only exit in between
is that ``wrmsr`` — whose handling is what logs the next ready early.  So
``interrupt_ready_acked_before_next`` is strict: after the quirk is accounted
for, any back-to-back ready is a failure (100 % of them in the no-ACK captures).
Without #PF events, the heuristic finds the same classes within 4 tokens on the
four healthy captures (stock-1: identical, and an identical ready→ACK
distribution).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain

from apflab.analysis.parse import WAKE_ALL_TOKEN, Event, Kind
from apflab.analysis.stats import Histogram

#: KVM's ``ASYNC_PF_PER_VCPU``: most tokens a vCPU may have outstanding.
MAX_OUTSTANDING_PER_VCPU = 64
#: The latency metrics of the verdict.json contract, in order.
METRICS = ("not_present_to_ready", "completed_to_ready", "ready_to_ack", "back_to_back_gap")
#: How the interrupt/halt class of a token was decided.
CLASSIFICATION_PF = "pf"
#: Heuristic used when the trace has no #PF injection events: every ready of a
#: known token is an interrupt-path *candidate*; an ACK acknowledges the most
#: recent candidate (or, when the ready just before the ACK was logged closer to
#: the ACK than to the candidate before it, the candidate before it: the
#: ordering quirk), and every older un-ACKed candidate is re-classed halt-path;
#: so are all candidates when the vCPU faults again (try_async_get_page,
#: not_present, repeated fault) before an ACK, and a last candidate with no
#: later event.  Back-to-back readies cannot be told from halt-path ones this
#: way and are not assessed.
CLASSIFICATION_HEURISTIC = "heuristic"

_NP, _READY, _COMPLETED, _REPEATED, _TRY, _ACK, _PF, _PF_RE, _MARK = (
    Kind.NOT_PRESENT,
    Kind.READY,
    Kind.COMPLETED,
    Kind.REPEATED_FAULT,
    Kind.TRY_GET_PAGE,
    Kind.ACK,
    Kind.PF,
    Kind.PF_REINJECTED,
    Kind.MARKER,
)
_UNKNOWN, _INT, _HALT = 0, 1, 2
_GUEST_RAN = frozenset((_NP, _TRY, _REPEATED))
# auto-detection of the classification (see _detect): look-ahead limits
_DETECT_NOT_PRESENT = 4096
_DETECT_EVENTS = 100_000
# readies waiting for ACK kept per vCPU before the oldest is written off (censored)
_ACK_FIFO_CAP = 4 * MAX_OUTSTANDING_PER_VCPU
_EXAMPLES = 3


@dataclass(frozen=True)
class Invariant:
    """One checked property: did it hold, and the numbers behind the answer."""

    ok: bool
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class OutstandingToken:
    """A token not readied when observation ended (a censored sample)."""

    vcpu: int | None
    pid: int
    token: int
    gva: int
    since_us: int
    age_us: int
    completed: bool  #: its ``kvm_async_pf_completed`` was seen (the page was ready)


@dataclass(frozen=True)
class UnackedReady:
    """An interrupt-delivered ready not ACKed when observation ended."""

    vcpu: int | None
    pid: int
    token: int
    ts_us: int
    age_us: int


@dataclass
class VcpuStats:
    """Per-vCPU counts.  ``vcpu`` is the index from the pid map, the id inferred
    from tokens, or None (no not_present seen and no map)."""

    pid: int
    vcpu: int | None = None
    not_present: int = 0
    ready: int = 0
    wake_all: int = 0
    interrupt_ready: int = 0
    halt_ready: int = 0
    unknown_ready: int = 0
    ack: int = 0
    ack_unmatched: int = 0
    ack_triggered_ready: int = 0
    back_to_back: int = 0
    pf_injected: int = 0
    pf_orphan: int = 0
    pf_reinjected: int = 0
    try_get_page: int = 0
    repeated_fault: int = 0
    halt_classified: int = 0
    interrupt_classified: int = 0
    bad_token: int = 0
    duplicate_not_present: int = 0
    flushed: int = 0
    max_outstanding: int = 0
    over_limit: int = 0  #: not_present events that took it above 64
    unacked_written_off: int = 0
    unresolved_at_end: int = 0  #: last not_present had no later event: counted halt-path

    @property
    def label(self) -> str:
        return f"vCPU {self.vcpu}" if self.vcpu is not None else f"pid {self.pid}"


@dataclass
class Timeline:
    """Outstanding APFs per vCPU over time, downsampled.

    ``series[label][i]`` is the *maximum* number of outstanding tokens on that
    vCPU during ``[t0_us + i * bin_us, t0_us + (i + 1) * bin_us)``; a series has
    at most ``max_bins`` points (bins double in width as the trace grows).
    """

    t0_us: int
    bin_us: int
    series: dict[str, list[int]]


@dataclass
class Analysis:
    """Everything :func:`analyze` found; plain data (documents: see
    :func:`apflab.analysis.verdict.analysis_document`).

    :ivar events: counters: the contract's ``not_present``, ``ready``,
        ``wake_all``, ``completed``, ``ack`` and many more (``interrupt_ready``,
        ``halt_ready``, ``ack_triggered_ready``, ``back_to_back``,
        ``outstanding_at_end``, ``unknown_ready``, ...)
    :ivar latency: the :data:`METRICS` histograms (µs; censored samples included)
    :ivar invariants: the five trace invariants by name
    :ivar vcpus: per-vCPU counts, ordered by vCPU
    :ivar timeline: outstanding tokens per vCPU over time (downsampled)
    :ivar outstanding_at_end: tokens never readied (censored), oldest first
    :ivar unacked_at_end: interrupt-delivered readies never ACKed, oldest first
    :ivar classification: :data:`CLASSIFICATION_PF` or :data:`CLASSIFICATION_HEURISTIC`
    :ivar classification_detail: how the interrupt/halt class was decided, in words
    :ivar vcpu_ids: ``"map"`` (from ``vcpu_of_pid``) or ``"inferred"`` (token & 0xfff)
    :ivar start_us: first event time (None: no event)
    :ivar end_us: end of observation used for censoring
    :ivar grace_us: the grace the invariants were checked with
    :ivar halt_path_latency: not_present→ready of halt-path tokens only
    :ivar ack_triggered_lead: from an ACK-triggered ready's line to its ACK line
    :ivar examples: a few offending lines per problem, for details and reports
    """

    events: dict[str, int]
    latency: dict[str, Histogram]
    invariants: dict[str, Invariant]
    vcpus: list[VcpuStats]
    timeline: Timeline
    outstanding_at_end: list[OutstandingToken]
    unacked_at_end: list[UnackedReady]
    classification: str
    classification_detail: str
    vcpu_ids: str
    start_us: int | None
    end_us: int | None
    grace_us: int
    halt_path_latency: Histogram = field(default_factory=Histogram)
    ack_triggered_lead: Histogram = field(default_factory=Histogram)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def async_pfs(self) -> int:
        """Number of async PFs (not_present events)."""
        return self.events["not_present"]


class _Tok:
    __slots__ = ("cls", "completed_us", "gva", "np_us", "token", "vcpu")

    def __init__(self, token: int, np_us: int, gva: int, vcpu: _Vcpu) -> None:
        self.token = token
        self.np_us = np_us
        self.gva = gva
        self.vcpu = vcpu
        self.cls = _UNKNOWN
        self.completed_us: int | None = None


class _Vcpu:
    __slots__ = (
        "bins",
        "buf",
        "fifo",
        "last_ready_us",
        "level",
        "outstanding",
        "st",
        "tentative",
        "unresolved",
    )

    def __init__(self, pid: int, vcpu: int | None) -> None:
        self.st = VcpuStats(pid=pid, vcpu=vcpu)
        self.outstanding: dict[int, _Tok] = {}
        self.unresolved: _Tok | None = None
        self.buf: list[Event] = []
        # interrupt-delivered readies awaiting their ACK: (ts_us, token, not_present ts_us)
        # (heuristic mode: the candidates)
        self.fifo: deque[tuple[int, int, int]] = deque()
        # a ready that came while fifo was non-empty: (gap_us, ready_ts_us), settled by
        # the next event on this vCPU (ACK → ACK-triggered, else back-to-back)
        self.tentative: tuple[int, int] | None = None
        # heuristic mode: ts of the ready just before, if the previous event was one
        self.last_ready_us: int | None = None
        self.bins: list[int] = []
        self.level = 0


class _Analyzer:
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
        self.window_us = completion_window_us
        self.max_bins = max_bins
        self.bin_us = initial_bin_us
        self.t0: int | None = None
        self.last_ts: int | None = None
        self.mode = CLASSIFICATION_PF
        self.vcpus: dict[int, _Vcpu] = {}
        # outstanding, not yet completed tokens by gva (either-order matching)
        self.by_gva: dict[int, list[_Tok]] = {}
        # readies whose completion was not seen yet: gva -> ready times; expiry order
        self.ready_wait: dict[int, deque[int]] = {}
        self.ready_wait_order: deque[tuple[int, int]] = deque()
        self.np2r = Histogram()
        self.c2r = Histogram()
        self.r2a = Histogram()
        self.b2b = Histogram()
        self.halt = Histogram()
        self.lead = Histogram()
        self.completed = 0
        self.completed_unmatched = 0
        self.completed_after_ready = 0
        self.ready_without_completed = 0
        self.foreign = 0
        self.markers = 0
        self.examples: dict[str, list[str]] = {}
        self.classification_detail = ""

    # -- helpers ---------------------------------------------------------------
    def example(self, key: str, text: str) -> None:
        lst = self.examples.setdefault(key, [])
        if len(lst) < _EXAMPLES:
            lst.append(text)

    def vcpu(self, pid: int) -> _Vcpu | None:
        v = self.vcpus.get(pid)
        if v is None:
            if self.vcpu_of_pid is not None:
                idx = self.vcpu_of_pid.get(pid)
                if idx is None:
                    return None
                v = _Vcpu(pid, idx)
            else:
                v = _Vcpu(pid, None)
            self.vcpus[pid] = v
        return v

    def level(self, v: _Vcpu, ts: int, n: int) -> None:
        assert self.t0 is not None
        idx = max(0, (ts - self.t0) // self.bin_us)  # a line logged before the first: bin 0
        while idx >= self.max_bins:
            self.compact()
            idx = (ts - self.t0) // self.bin_us
        bins = v.bins
        if idx >= len(bins):
            bins.extend([v.level] * (idx + 1 - len(bins)))
        bins[idx] = max(bins[idx], n)
        v.level = n

    def compact(self) -> None:
        self.bin_us *= 2
        for v in self.vcpus.values():
            b = v.bins
            v.bins = [max(b[i : i + 2]) for i in range(0, len(b), 2)]

    def expire_ready_wait(self, now: int) -> None:
        order = self.ready_wait_order
        limit = now - self.window_us
        while order and order[0][0] < limit:
            ts, gva = order.popleft()
            q = self.ready_wait.get(gva)
            if q and q[0] == ts:
                q.popleft()
                self.ready_without_completed += 1
                if not q:
                    del self.ready_wait[gva]

    # -- events ------------------------------------------------------------------
    def on_completed(self, ts: int, gva: int) -> None:
        self.completed += 1
        toks = self.by_gva.get(gva)
        if toks:
            t = toks.pop(0)
            if not toks:
                del self.by_gva[gva]
            t.completed_us = ts
            return
        q = self.ready_wait.get(gva)
        if q:
            ready_us = q.popleft()
            if not q:
                del self.ready_wait[gva]
            self.completed_after_ready += 1
            self.c2r.record(ready_us - ts)  # negative: recorded as 0
            return
        self.completed_unmatched += 1

    def settle(self, v: _Vcpu, ts: int, is_ack: bool) -> None:
        """Decide the pending tentative back-to-back ready of ``v``."""
        tent = v.tentative
        if tent is None:
            return
        v.tentative = None
        gap, ready_us = tent
        if is_ack:
            v.st.ack_triggered_ready += 1
            self.lead.record(ts - ready_us)
        else:
            v.st.back_to_back += 1
            self.b2b.record(gap)
            self.example(
                "back_to_back",
                f"{v.st.label}: ready at {ready_us} us, {gap} us after an un-ACKed one",
            )

    def interrupt_ready(self, v: _Vcpu, ts: int, token: int, np_us: int) -> None:
        fifo = v.fifo
        if fifo and self.mode == CLASSIFICATION_PF:
            v.tentative = (ts - fifo[-1][0], ts)
        fifo.append((ts, token, np_us))
        if len(fifo) > _ACK_FIFO_CAP:
            old_ts, _, _ = fifo.popleft()
            self.r2a.record(ts - old_ts, censored=True)
            v.st.unacked_written_off += 1

    def resolve(self, v: _Vcpu, cls: int) -> None:
        t = v.unresolved
        assert t is not None
        v.unresolved = None
        t.cls = cls
        if cls == _INT:
            v.st.interrupt_classified += 1
        else:
            v.st.halt_classified += 1
        buf = v.buf
        if buf:
            v.buf = []
            for ev in buf:
                self.step(v, ev)

    def feed(self, ev: Event) -> None:
        ts, pid, _cpu, kind, _token, gva = ev
        if self.t0 is None:
            self.t0 = ts
        if self.last_ts is None or ts > self.last_ts:
            self.last_ts = ts
        if kind is _COMPLETED:
            self.on_completed(ts, gva)
            return
        if kind is _MARK:
            self.markers += 1
            return
        v = self.vcpus.get(pid) or self.vcpu(pid)
        if v is None:
            self.foreign += 1
            return
        if v.unresolved is not None:
            if kind is _READY or kind is _PF_RE:
                v.buf.append(ev)
                return
            if kind is _PF:
                self.resolve(v, _INT)
                v.st.pf_injected += 1
                self.settle(v, ts, False)
                v.last_ready_us = None
                return
            self.resolve(v, _HALT)
        self.step(v, ev)

    def step(self, v: _Vcpu, ev: Event) -> None:  # noqa: PLR0912, PLR0915 (one state machine)
        ts, _pid, _cpu, kind, token, gva = ev
        st = v.st
        if v.tentative is not None:
            self.settle(v, ts, kind is _ACK)
        if v.fifo and self.mode == CLASSIFICATION_HEURISTIC and kind in _GUEST_RAN:
            self.heuristic_guest_ran(v)
        if kind is _NP:
            st.not_present += 1
            out = v.outstanding
            old = out.get(token)
            if old is not None:
                st.duplicate_not_present += 1
                self.example("duplicate_not_present", f"{st.label}: token {token:#x} at {ts} us")
                self._drop_gva(old)
            if token in (0, WAKE_ALL_TOKEN):
                st.bad_token += 1
                self.example("bad_token", f"{st.label}: not_present token {token:#x} at {ts} us")
            elif st.vcpu is None:
                st.vcpu = token & 0xFFF
            elif token & 0xFFF != st.vcpu:
                st.bad_token += 1
                self.example(
                    "bad_token",
                    f"{st.label} (pid {st.pid}): token {token:#x} has id {token & 0xFFF} "
                    f"at {ts} us",
                )
            t = _Tok(token, ts, gva, v)
            out[token] = t
            lst = self.by_gva.get(gva)
            if lst is None:
                self.by_gva[gva] = [t]
            else:
                lst.append(t)
            n = len(out)
            st.max_outstanding = max(st.max_outstanding, n)
            if n > MAX_OUTSTANDING_PER_VCPU:
                st.over_limit += 1
            self.level(v, ts, n)
            if self.mode == CLASSIFICATION_PF:
                v.unresolved = t
            v.last_ready_us = None
        elif kind is _READY:
            st.ready += 1
            if token == WAKE_ALL_TOKEN:
                st.wake_all += 1
                if v.outstanding:
                    st.flushed += len(v.outstanding)
                    for t in v.outstanding.values():
                        self._drop_gva(t)
                    v.outstanding.clear()
                    self.level(v, ts, 0)
                self.interrupt_ready(v, ts, token, -1)
                v.last_ready_us = ts
                return
            tok = v.outstanding.pop(token, None)
            if tok is None:
                st.unknown_ready += 1
                where = next(
                    (o.st.label for o in self.vcpus.values() if token in o.outstanding), None
                )
                extra = f" (outstanding on {where})" if where else ""
                self.example(
                    "unknown_ready", f"{st.label}: ready token {token:#x} at {ts} us{extra}"
                )
                v.last_ready_us = None
                return
            self.level(v, ts, len(v.outstanding))
            self.np2r.record(ts - tok.np_us)
            if tok.completed_us is not None:
                if ts < tok.completed_us:
                    self.completed_after_ready += 1
                self.c2r.record(ts - tok.completed_us)
            else:
                self._drop_gva(tok)
                q = self.ready_wait.get(tok.gva)
                if q is None:
                    self.ready_wait[tok.gva] = deque((ts,))
                else:
                    q.append(ts)
                self.ready_wait_order.append((ts, tok.gva))
                self.expire_ready_wait(ts)
            if tok.cls == _INT:
                st.interrupt_ready += 1
                self.interrupt_ready(v, ts, token, tok.np_us)
            elif tok.cls == _HALT:
                st.halt_ready += 1
                self.halt.record(ts - tok.np_us)
            else:  # heuristic mode: a candidate until an ACK says otherwise
                self.heuristic_ready(v, ts, token, tok.np_us)
                return
            v.last_ready_us = ts
        elif kind is _ACK:
            st.ack += 1
            if self.mode == CLASSIFICATION_HEURISTIC:
                self.heuristic_ack(v, ts)
            elif v.fifo:
                ready_us, _, _ = v.fifo.popleft()
                self.r2a.record(ts - ready_us)
            else:
                st.ack_unmatched += 1
                self.example("ack_unmatched", f"{st.label}: ACK at {ts} us")
            v.last_ready_us = None
        elif kind is _PF:
            st.pf_orphan += 1
            v.last_ready_us = None
        elif kind is _PF_RE:
            st.pf_reinjected += 1
        elif kind is _TRY:
            st.try_get_page += 1
            v.last_ready_us = None
        elif kind is _REPEATED:
            st.repeated_fault += 1
            v.last_ready_us = None

    def _drop_gva(self, t: _Tok) -> None:
        lst = self.by_gva.get(t.gva)
        if lst is not None and t in lst:
            lst.remove(t)
            if not lst:
                del self.by_gva[t.gva]

    # -- heuristic classification (no #PF events in the trace) -------------------
    def heuristic_ready(self, v: _Vcpu, ts: int, token: int, np_us: int) -> None:
        v.fifo.append((ts, token, np_us))
        v.last_ready_us = ts
        if len(v.fifo) > _ACK_FIFO_CAP:
            self._reclass_halt(v, v.fifo.popleft())

    def _reclass_halt(self, v: _Vcpu, entry: tuple[int, int, int]) -> None:
        ready_us, token, np_us = entry
        if token == WAKE_ALL_TOKEN:
            return
        v.st.halt_ready += 1
        self.halt.record(ready_us - np_us)

    def heuristic_guest_ran(self, v: _Vcpu) -> None:
        # The guest faulted again with candidates un-ACKed: a delivered page-ready
        # interrupt is handled (and ACKed) before that, so they were halt-path
        # (measured: 0 of 55,215 not_present events in the four healthy captures
        # came while an interrupt-delivered ready was un-ACKed).
        keep = [e for e in v.fifo if e[1] == WAKE_ALL_TOKEN]
        for e in v.fifo:
            if e[1] != WAKE_ALL_TOKEN:
                self._reclass_halt(v, e)
        v.fifo = deque(keep)

    def heuristic_ack(self, v: _Vcpu, ts: int) -> None:
        fifo = v.fifo
        st = v.st
        if not fifo:
            st.ack_unmatched += 1
            return
        keep: tuple[int, int, int] | None = None
        if len(fifo) >= 2 and v.last_ready_us is not None and fifo[-1][0] == v.last_ready_us:
            last, before = fifo[-1], fifo[-2]
            # the ready right before the ACK line was logged nearer the ACK than the
            # candidate before it: dequeued by this ACK (ordering quirk)
            if ts - last[0] < last[0] - before[0]:
                keep = fifo.pop()
                st.ack_triggered_ready += 1
                self.lead.record(ts - keep[0])
        ready_us, token, _ = fifo.pop()
        if token != WAKE_ALL_TOKEN:
            st.interrupt_ready += 1
        self.r2a.record(ts - ready_us)
        while fifo:
            self._reclass_halt(v, fifo.popleft())
        if keep is not None:
            fifo.append(keep)

    # -- the end -----------------------------------------------------------------
    def finish(self, end_ts_us: int | None) -> Analysis:
        end = end_ts_us if end_ts_us is not None else self.last_ts
        outstanding: list[OutstandingToken] = []
        unacked: list[UnackedReady] = []
        for v in self.vcpus.values():
            if v.unresolved is not None:
                # no guest entry on this vCPU after its last not_present was observed:
                # no #PF was delivered, so no ACK can be expected (a token it left
                # outstanding is censored whatever its class)
                v.st.unresolved_at_end += 1
                self.resolve(v, _HALT)
            if v.tentative is not None:
                # no ACK line followed before the end: a back-to-back ready
                self.settle(v, end or 0, False)
        if self.mode == CLASSIFICATION_HEURISTIC:
            for v in self.vcpus.values():
                # the newest candidate may still await its ACK; older ones were halt-path
                while len(v.fifo) > 1:
                    self._reclass_halt(v, v.fifo.popleft())
                if v.fifo and v.last_ready_us == v.fifo[0][0]:
                    # nothing happened on this vCPU after that ready: no sign the guest
                    # ran, so no ACK can be expected (as for the #PF classification)
                    self._reclass_halt(v, v.fifo.popleft())
                if v.fifo and v.fifo[0][1] != WAKE_ALL_TOKEN:
                    v.st.interrupt_ready += 1
        self.ready_without_completed += sum(len(q) for q in self.ready_wait.values())
        for v in self.vcpus.values():
            st = v.st
            for t in v.outstanding.values():
                age = max(0, (end or t.np_us) - t.np_us)
                self.np2r.record(age, censored=True)
                if t.completed_us is not None:
                    self.c2r.record((end or t.completed_us) - t.completed_us, censored=True)
                outstanding.append(
                    OutstandingToken(
                        st.vcpu, st.pid, t.token, t.gva, t.np_us, age, t.completed_us is not None
                    )
                )
            for ready_us, token, _ in v.fifo:
                age = max(0, (end or ready_us) - ready_us)
                self.r2a.record(age, censored=True)
                unacked.append(UnackedReady(st.vcpu, st.pid, token, ready_us, age))
        outstanding.sort(key=lambda o: o.since_us)
        unacked.sort(key=lambda u: u.ts_us)

        stats = sorted(
            (v.st for v in self.vcpus.values() if v.st.not_present or v.st.ready or v.st.ack),
            key=lambda s: (s.vcpu is None, s.vcpu if s.vcpu is not None else 0, s.pid),
        )
        events = self._event_counts(stats, outstanding, unacked)
        timeline = self._timeline(stats, end)
        analysis = Analysis(
            events=events,
            latency={
                "not_present_to_ready": self.np2r,
                "completed_to_ready": self.c2r,
                "ready_to_ack": self.r2a,
                "back_to_back_gap": self.b2b,
            },
            invariants={},
            vcpus=stats,
            timeline=timeline,
            outstanding_at_end=outstanding,
            unacked_at_end=unacked,
            classification=self.mode,
            classification_detail=self.classification_detail,
            vcpu_ids="map" if self.vcpu_of_pid is not None else "inferred",
            start_us=self.t0,
            end_us=end,
            grace_us=self.grace_us,
            halt_path_latency=self.halt,
            ack_triggered_lead=self.lead,
            examples=self.examples,
        )
        analysis.invariants = _invariants(analysis)
        return analysis

    def _event_counts(
        self,
        stats: list[VcpuStats],
        outstanding: list[OutstandingToken],
        unacked: list[UnackedReady],
    ) -> dict[str, int]:
        def total(name: str) -> int:
            return sum(int(getattr(s, name)) for s in stats)

        heuristic = self.mode == CLASSIFICATION_HEURISTIC
        int_tokens = total("interrupt_ready") if heuristic else total("interrupt_classified")
        halt_tokens = total("halt_ready") if heuristic else total("halt_classified")

        return {
            "not_present": total("not_present"),
            "ready": total("ready"),
            "wake_all": total("wake_all"),
            "completed": self.completed,
            "ack": total("ack"),
            "interrupt_ready": total("interrupt_ready"),
            "halt_ready": total("halt_ready"),
            "unknown_ready": total("unknown_ready"),
            "ack_unmatched": total("ack_unmatched"),
            "ack_triggered_ready": total("ack_triggered_ready"),
            "back_to_back": total("back_to_back"),
            "pf_injected": total("pf_injected"),
            "pf_orphan": total("pf_orphan"),
            "pf_reinjected": total("pf_reinjected"),
            "interrupt_path_tokens": int_tokens,
            "halt_path_tokens": halt_tokens,
            "unresolved_at_end": total("unresolved_at_end"),
            "flushed": total("flushed"),
            "duplicate_not_present": total("duplicate_not_present"),
            "bad_token": total("bad_token"),
            "outstanding_at_end": len(outstanding),
            "unacked_at_end": len(unacked),
            "unacked_written_off": total("unacked_written_off"),
            "completed_unmatched": self.completed_unmatched,
            "completed_after_ready": self.completed_after_ready,
            "ready_without_completed": self.ready_without_completed,
            "try_async_get_page": total("try_get_page"),
            "repeated_fault": total("repeated_fault"),
            "foreign": self.foreign,
            "markers": self.markers,
        }

    def _timeline(self, stats: list[VcpuStats], end: int | None) -> Timeline:
        if self.t0 is None or end is None:
            return Timeline(0, self.bin_us, {})
        for v in self.vcpus.values():
            if v.st in stats:
                self.level(v, max(end, self.t0), v.level)
        series = {v.st.label: v.bins for v in self.vcpus.values() if v.st in stats}
        return Timeline(self.t0, self.bin_us, dict(sorted(series.items())))


def _fmt_s(us: int) -> str:
    return f"{us / 1e6:.3f} s" if us >= 1_000_000 else f"{us / 1e3:.1f} ms"


def _invariants(a: Analysis) -> dict[str, Invariant]:
    ev = a.events
    ex = a.examples
    grace = a.grace_us

    def first(key: str) -> str:
        return f"; e.g. {ex[key][0]}" if ex.get(key) else ""

    # every_not_present_readied
    old = [o for o in a.outstanding_at_end if o.age_us > grace]
    young = len(a.outstanding_at_end) - len(old)
    readied = ev["not_present"] - ev["outstanding_at_end"] - ev["flushed"]
    readied -= ev["duplicate_not_present"]
    detail = (
        f"{ev['not_present']} not_present: {readied} readied, {ev['flushed']} flushed by a "
        f"wake-all, {len(a.outstanding_at_end)} outstanding at the end "
        f"({len(old)} older than the {_fmt_s(grace)} grace)"
    )
    if ev["duplicate_not_present"]:
        detail += f", {ev['duplicate_not_present']} re-announced while outstanding"
        detail += first("duplicate_not_present")
    if old:
        o = old[0]
        detail += (
            f"; oldest: token {o.token:#x} on vCPU {o.vcpu} (pid {o.pid}) outstanding "
            f"{_fmt_s(o.age_us)}{' after its page completed' if o.completed else ''}"
        )
    elif young:
        detail += " (censored, within grace)"
    inv = {
        "every_not_present_readied": Invariant(not old and not ev["duplicate_not_present"], detail)
    }

    # no_ready_for_unknown_token
    n = ev["unknown_ready"]
    inv["no_ready_for_unknown_token"] = Invariant(
        n == 0,
        f"{n} of {ev['ready']} readies for a token never announced on that vCPU "
        f"({ev['wake_all']} wake-all 0xffffffff excluded){first('unknown_ready')}",
    )

    # outstanding_per_vcpu_le_64
    per = ", ".join(f"{s.label} {s.max_outstanding}" for s in a.vcpus) or "no vCPU"
    over = [s for s in a.vcpus if s.max_outstanding > MAX_OUTSTANDING_PER_VCPU]
    inv["outstanding_per_vcpu_le_64"] = Invariant(
        not over, f"max outstanding per vCPU (limit {MAX_OUTSTANDING_PER_VCPU}): {per}"
    )

    # token_vcpu_id_matches
    bad = ev["bad_token"]
    ids = [s.vcpu for s in a.vcpus if s.vcpu is not None]
    clash = len(ids) != len(set(ids))
    how = (
        "vCPU ids from the pid map"
        if a.vcpu_ids == "map"
        else "no pid→vCPU map: vCPU ids inferred from token & 0xfff of each thread's "
        "first not_present, so only consistency is checked"
    )
    detail = f"{bad} of {ev['not_present']} tokens are 0 or have token & 0xfff != vCPU id ({how})"
    if clash:
        detail += "; two threads share one vCPU id"
    inv["token_vcpu_id_matches"] = Invariant(bad == 0 and not clash, detail + first("bad_token"))

    # interrupt_ready_acked_before_next
    old_unacked = [u for u in a.unacked_at_end if u.age_us > grace]
    b2b = ev["back_to_back"]
    parts = [
        f"{ev['interrupt_ready']} interrupt-path readies + {ev['wake_all']} wake-all, "
        f"{ev['ack']} ACKs ({ev['ack_unmatched']} with no ready pending)",
        f"{ev['ack_triggered_ready']} readies logged just before the ACK that dequeued them "
        "(ordering quirk, not back-to-back)",
    ]
    if a.classification == CLASSIFICATION_PF:
        parts.append(f"{b2b} back-to-back (delivered before the previous one was ACKed)")
        ok = b2b == 0
    else:
        parts.append("back-to-back not assessed: classification heuristic (no #PF events)")
        ok = True
    parts.append(
        f"{len(a.unacked_at_end)} never ACKed ({len(old_unacked)} older than {_fmt_s(grace)})"
    )
    if ev["unacked_written_off"]:
        parts.append(f"{ev['unacked_written_off']} written off un-ACKed (queue cap)")
    ok = ok and not old_unacked and not ev["unacked_written_off"]
    inv["interrupt_ready_acked_before_next"] = Invariant(
        ok, "; ".join(parts) + first("back_to_back")
    )
    return inv


def _detect(events: Iterator[Event]) -> tuple[str, str, list[Event]]:
    """Look ahead from the first not_present: does the trace have #PF injection events?

    Stops at the first #PF (→ #PF classification); at the first ACK after a ready of
    a token — in a trace with #PF events that token's #PF would have come first
    (→ heuristic); or after :data:`_DETECT_NOT_PRESENT` not_present /
    :data:`_DETECT_EVENTS` events or the end (→ heuristic).  A healthy boot can start
    with a long run of halt-path faults without any #PF (stock-1: 194).
    """
    head: list[Event] = []
    seen_np = 0
    token_ready = False
    for ev in events:
        head.append(ev)
        kind = ev.kind
        if kind is _PF or kind is _PF_RE:
            return CLASSIFICATION_PF, "", head
        if kind is _NP:
            seen_np += 1
        elif kind is _READY:
            token_ready = token_ready or ev.token != WAKE_ALL_TOKEN
        elif kind is _ACK and token_ready:
            break
        if seen_np >= _DETECT_NOT_PRESENT or len(head) >= _DETECT_EVENTS:
            break
    if not head:
        return CLASSIFICATION_PF, "", head  # no async PF at all: nothing to classify
    return (
        CLASSIFICATION_HEURISTIC,
        f"no kvm_inj_exception #PF event in the first {len(head)} events from the first "
        f"not_present: interrupt/halt path inferred from ACKs (heuristic)",
        head,
    )


def analyze(
    events: Iterable[Event],
    vcpu_of_pid: Mapping[int, int] | None = None,
    end_ts_us: int | None = None,
    *,
    grace_us: int = 1_000_000,
    classification: str = "auto",
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
    """
    if classification not in ("auto", CLASSIFICATION_PF, CLASSIFICATION_HEURISTIC):
        raise ValueError(f"classification must be auto, pf or heuristic, not {classification!r}")
    an = _Analyzer(vcpu_of_pid, grace_us, completion_window_us, max_timeline_bins, initial_bin_us)
    it = iter(events)
    prefix: list[Event] = []
    if classification == "auto":
        # events before the first not_present cannot depend on the class: process them
        for ev in it:
            if ev.kind is _NP:
                prefix.append(ev)
                break
            an.feed(ev)
        mode, detail, head = _detect(chain(prefix, it))
        an.mode = mode
        an.classification_detail = detail or "interrupt/halt path from the #PF injection"
        stream: Iterable[Event] = chain(head, it)
    else:
        an.mode = classification
        an.classification_detail = (
            "interrupt/halt path from the #PF injection"
            if classification == CLASSIFICATION_PF
            else "interrupt/halt path inferred from ACKs (heuristic, forced)"
        )
        stream = it
    feed = an.feed
    for ev in stream:
        feed(ev)
    return an.finish(end_ts_us)
