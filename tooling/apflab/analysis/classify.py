"""Which classification a trace allows: the #PF injection, or the heuristic.

The interrupt/halt class of a token is read from the ``kvm_inj_exception`` #PF
that follows its not_present (:data:`~apflab.analysis.model.CLASSIFICATION_PF`).
A trace recorded without that event cannot tell, and needs the heuristic
(:data:`~apflab.analysis.model.CLASSIFICATION_HEURISTIC`).  With ``"auto"``,
:func:`choose_classification` looks ahead in the stream to see which one it is,
keeping what it read so nothing is lost: the analysis stays one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Final

from apflab.analysis.model import CLASSIFICATION_HEURISTIC, CLASSIFICATION_PF
from apflab.analysis.parse import WAKE_ALL_TOKEN, Event, Kind

AUTO: Final = "auto"
#: the values of ``analyze(classification=...)``
CHOICES = (AUTO, CLASSIFICATION_PF, CLASSIFICATION_HEURISTIC)
#: look-ahead limits of the auto-detection
DETECT_NOT_PRESENT: Final = 4096
DETECT_EVENTS: Final = 100_000
_PF_DETAIL: Final = "interrupt/halt path from the #PF injection"
_FORCED_HEURISTIC_DETAIL: Final = "interrupt/halt path inferred from ACKs (heuristic, forced)"


def detect(events: Iterator[Event]) -> tuple[str, str, list[Event]]:
    """Look ahead from the first not_present: does the trace have #PF injection events?

    Stops at the first #PF (→ #PF classification); at the first ACK after a ready of
    a token — in a trace with #PF events that token's #PF would have come first
    (→ heuristic); or after :data:`DETECT_NOT_PRESENT` not_present /
    :data:`DETECT_EVENTS` events or the end (→ heuristic).  A healthy boot can start
    with a long run of halt-path faults without any #PF (stock-1: 194).

    :returns: the classification, why (empty for the #PF one) and the events read
    """
    head: list[Event] = []
    seen_not_present = 0
    token_ready = False
    for ev in events:
        head.append(ev)
        kind = ev.kind
        if kind is Kind.PF or kind is Kind.PF_REINJECTED:
            return CLASSIFICATION_PF, "", head
        if kind is Kind.NOT_PRESENT:
            seen_not_present += 1
        elif kind is Kind.READY:
            token_ready = token_ready or ev.token != WAKE_ALL_TOKEN
        elif kind is Kind.ACK and token_ready:
            break
        if seen_not_present >= DETECT_NOT_PRESENT or len(head) >= DETECT_EVENTS:
            break
    if not head:
        return CLASSIFICATION_PF, "", head  # no async PF at all: nothing to classify
    return (
        CLASSIFICATION_HEURISTIC,
        f"no kvm_inj_exception #PF event in the first {len(head)} events from the first "
        f"not_present: interrupt/halt path inferred from ACKs (heuristic)",
        head,
    )


def choose_classification(
    requested: str, events: Iterable[Event], feed: Callable[[Event], None]
) -> tuple[str, str, Iterable[Event]]:
    """Settle the classification before the analysis needs it.

    :param requested: one of :data:`CHOICES`
    :param events: the whole stream
    :param feed: takes the events before the first not_present, which cannot depend
        on the class (with ``"auto"`` only)
    :returns: the classification, how it is decided in words, and the events
        still to analyse (those looked ahead at included)
    :raises ValueError: ``requested`` is not one of :data:`CHOICES`
    """
    if requested not in CHOICES:
        raise ValueError(f"classification must be auto, pf or heuristic, not {requested!r}")
    it = iter(events)
    if requested == CLASSIFICATION_PF:
        return requested, _PF_DETAIL, it
    if requested == CLASSIFICATION_HEURISTIC:
        return requested, _FORCED_HEURISTIC_DETAIL, it
    first: list[Event] = []
    for ev in it:
        if ev.kind is Kind.NOT_PRESENT:
            first.append(ev)
            break
        feed(ev)
    method, detail, head = detect(chain(first, it))
    return method, detail or _PF_DETAIL, chain(head, it)
