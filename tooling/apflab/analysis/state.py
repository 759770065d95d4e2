"""The analyzer's working records: a token, a delivered ready, and a vCPU's state.

:mod:`~apflab.analysis.tokens` and :mod:`~apflab.analysis.acks` both update a
:class:`VcpuState`; each field says which of them owns it.  Nothing here
survives the analysis: the results are the records of :mod:`~apflab.analysis.model`.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Final, NamedTuple

from apflab.analysis.model import VcpuStats
from apflab.analysis.parse import Event
from apflab.analysis.timeline import Series

#: Offending lines kept per problem in :attr:`~apflab.analysis.model.Analysis.examples`.
EXAMPLES_PER_PROBLEM: Final = 3


def add_example(examples: dict[str, list[str]], problem: str, text: str) -> None:
    """Keep ``text`` as an example of ``problem`` unless enough are kept already."""
    kept = examples.setdefault(problem, [])
    if len(kept) < EXAMPLES_PER_PROBLEM:
        kept.append(text)


class Delivery(Enum):
    """How KVM delivers a token's page-ready (see :mod:`~apflab.analysis.acks`)."""

    #: not decided yet (and, with the heuristic classification, never per token)
    UNKNOWN = "unknown"
    #: the "page not present" #PF was injected: the ready comes as an interrupt
    #: and the guest ACKs it
    INTERRUPT = "interrupt"
    #: no #PF: KVM halted the vCPU; the ready wakes it, no interrupt, no ACK
    HALT = "halt"


class Token:
    """One async PF, from its not_present to its ready."""

    __slots__ = ("completed_us", "delivery", "gva", "not_present_us", "token")

    def __init__(self, token: int, not_present_us: int, gva: int) -> None:
        self.token = token
        self.not_present_us = not_present_us
        self.gva = gva
        self.delivery = Delivery.UNKNOWN
        #: when its ``kvm_async_pf_completed`` was logged (None: not seen yet)
        self.completed_us: int | None = None


class DeliveredReady(NamedTuple):
    """An interrupt-delivered ready waiting for its ACK (heuristic: a candidate)."""

    ready_us: int
    token: int
    not_present_us: int  #: -1 for a wake-all
    completed_us: int  #: its kvm_async_pf_completed, -1 if not seen (yet) or a wake-all


class VcpuState:
    """What the analysis keeps about one vCPU thread while it reads the trace."""

    __slots__ = (
        "awaiting_ack",
        "held_back",
        "maybe_back_to_back",
        "outstanding",
        "ready_right_before_us",
        "series",
        "stats",
        "unclassified",
    )

    def __init__(self, pid: int, vcpu: int | None, series: Series) -> None:
        #: the counts that end up in the result
        self.stats = VcpuStats(pid=pid, vcpu=vcpu)
        #: tokens announced by a not_present and not readied yet (tokens.py)
        self.outstanding: dict[int, Token] = {}
        #: outstanding tokens over time (timeline.py)
        self.series = series
        # --- acks.py -------------------------------------------------------------
        #: the last not_present, until the next event on this vCPU tells whether
        #: its #PF was injected (#PF classification only)
        self.unclassified: Token | None = None
        #: readies and reinjected #PFs logged while ``unclassified`` is set: they
        #: are replayed once its class is known
        self.held_back: list[Event] = []
        #: interrupt-delivered readies awaiting their ACK, oldest first
        #: (heuristic classification: the candidates)
        self.awaiting_ack: deque[DeliveredReady] = deque()
        #: ``(gap_us, ready_us, completed_us)`` of a ready that came while an older
        #: one was un-ACKed: the next event on this vCPU decides (an ACK →
        #: ACK-triggered, i.e. dequeued from KVM's queue by that ACK; anything
        #: else → back-to-back)
        self.maybe_back_to_back: tuple[int, int, int] | None = None
        #: the time of the ready that was the previous event on this vCPU, None if
        #: that was something else (the heuristic's test for the ordering quirk)
        self.ready_right_before_us: int | None = None
