"""The plain records :func:`apflab.analysis.analyzer.analyze` returns.

Data only: how they are computed lives in the analyzer's modules, how they are
written out in :mod:`apflab.analysis.verdict`.  The field names of
:class:`VcpuStats` and the keys of :attr:`Analysis.events` are part of the
verdict.json contract (``vcpus``, ``counters``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from apflab.analysis.stats import Histogram

#: KVM's ``ASYNC_PF_PER_VCPU``: most tokens a vCPU may have outstanding.
MAX_OUTSTANDING_PER_VCPU: Final = 64
#: The latency metrics of the verdict.json contract, in order.
METRICS = (
    "not_present_to_ready",
    "completed_to_ready",
    "ready_to_ack",
    "back_to_back_gap",
    "queued_completed_to_ready",
)
#: How the interrupt/halt class of a token was decided: from the #PF injection
#: that follows its not_present (see :mod:`apflab.analysis.acks`).
CLASSIFICATION_PF: Final = "pf"
#: Heuristic used when the trace has no #PF injection events: every ready of a
#: known token is an interrupt-path *candidate*; an ACK acknowledges the most
#: recent candidate (or, when the ready just before the ACK was logged closer to
#: the ACK than to the candidate before it, the candidate before it: the
#: ordering quirk), and every older un-ACKed candidate is re-classed halt-path;
#: so are all candidates when the vCPU faults again (try_async_get_page,
#: not_present, repeated fault) before an ACK, and a last candidate with no
#: later event.  Back-to-back readies cannot be told from halt-path ones this
#: way and are not assessed.
CLASSIFICATION_HEURISTIC: Final = "heuristic"


@dataclass(frozen=True)
class Invariant:
    """One checked property: did it hold, and the numbers behind the answer.

    :ivar evaluated: False when the evidence to check it was missing (``ok`` is then
        False too, but nothing was seen to break it: the run is INVALID, not FAIL)
    """

    ok: bool
    detail: str
    evaluated: bool = True

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail, "evaluated": self.evaluated}


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
    #: per bin, the longest not_present→ready (µs) of the readies logged in it
    ready_latency_max_us: list[int] = field(default_factory=list)


@dataclass
class Analysis:
    """Everything :func:`~apflab.analysis.analyzer.analyze` found; plain data
    (documents: see :func:`apflab.analysis.verdict.analysis_document`).

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
