"""The counters of :attr:`~apflab.analysis.model.Analysis.events`, from the per-vCPU counts.

Every key is part of the verdict.json contract (``counters``; the first five
also in ``events``), so the dict is spelt out in one place, in its order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from apflab.analysis.model import VcpuStats
from apflab.analysis.tokens import CompletionMatcher

# VcpuStats fields that are not counters
_NOT_SUMMED = frozenset(("pid", "vcpu"))


def vcpus_in_order(stats: Iterable[VcpuStats]) -> list[VcpuStats]:
    """The vCPUs that logged a not_present, ready or ACK: by vCPU id, then pid
    (threads of unknown id last)."""
    return sorted(
        (s for s in stats if s.not_present or s.ready or s.ack),
        key=lambda s: (s.vcpu is None, s.vcpu if s.vcpu is not None else 0, s.pid),
    )


def sum_counts(stats: Iterable[VcpuStats]) -> VcpuStats:
    """One :class:`VcpuStats` holding the sum of every counter (pid 0, no vCPU)."""
    total = VcpuStats(pid=0)
    counters = [f.name for f in dataclasses.fields(VcpuStats) if f.name not in _NOT_SUMMED]
    for s in stats:
        for name in counters:
            setattr(total, name, getattr(total, name) + getattr(s, name))
    return total


def event_counts(
    stats: list[VcpuStats],
    *,
    heuristic: bool,
    completions: CompletionMatcher,
    outstanding_at_end: int,
    unacked_at_end: int,
    foreign: int,
    markers: int,
) -> dict[str, int]:
    """:attr:`~apflab.analysis.model.Analysis.events` of one analysis.

    :param stats: the vCPUs counted (:func:`vcpus_in_order`)
    :param heuristic: the classification was the heuristic: a token's class is
        that of its ready, not of its #PF
    :param foreign: events of threads outside the pid map
    :param markers: ``trace_marker`` lines
    """
    t = sum_counts(stats)
    return {
        "not_present": t.not_present,
        "ready": t.ready,
        "wake_all": t.wake_all,
        "completed": completions.completed,
        "ack": t.ack,
        "interrupt_ready": t.interrupt_ready,
        "halt_ready": t.halt_ready,
        "unknown_ready": t.unknown_ready,
        "ack_unmatched": t.ack_unmatched,
        "ack_triggered_ready": t.ack_triggered_ready,
        "back_to_back": t.back_to_back,
        "pf_injected": t.pf_injected,
        "pf_orphan": t.pf_orphan,
        "pf_reinjected": t.pf_reinjected,
        "interrupt_path_tokens": t.interrupt_ready if heuristic else t.interrupt_classified,
        "halt_path_tokens": t.halt_ready if heuristic else t.halt_classified,
        "unresolved_at_end": t.unresolved_at_end,
        "flushed": t.flushed,
        "duplicate_not_present": t.duplicate_not_present,
        "bad_token": t.bad_token,
        "outstanding_at_end": outstanding_at_end,
        "unacked_at_end": unacked_at_end,
        "unacked_written_off": t.unacked_written_off,
        "completed_unmatched": completions.completed_unmatched,
        "completed_after_ready": completions.completed_after_ready,
        "ready_without_completed": completions.ready_without_completed,
        "try_async_get_page": t.try_get_page,
        "repeated_fault": t.repeated_fault,
        "foreign": foreign,
        "markers": markers,
    }
