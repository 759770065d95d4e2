"""The life of an async-PF token: not_present → completed → ready.

What it looks like in a 6.1 host (``arch/x86/kvm/x86.c``, ``virt/kvm/async_pf.c``),
and how it is measured here:

* ``kvm_async_pf_not_present`` (vCPU thread) starts a token.  ``token & 0xfff``
  is the vCPU id; a vCPU may have at most 64 outstanding (``ASYNC_PF_PER_VCPU``).
  Whether its page-ready will come as an interrupt or by waking a halted vCPU
  is decided by what follows on the vCPU (see :mod:`apflab.analysis.acks`).
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
* **Censoring:** at the end of observation tokens still outstanding enter
  not_present→ready (and completed→ready when their completion was seen) with
  their age as a *censored* sample, so a stall shows as a long tail, never as a
  fast median.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Final

from apflab.analysis.model import MAX_OUTSTANDING_PER_VCPU, OutstandingToken
from apflab.analysis.parse import WAKE_ALL_TOKEN
from apflab.analysis.state import Token, VcpuState, add_example
from apflab.analysis.stats import Histogram

#: token & VCPU_ID_MASK is the id of the vCPU that took the fault
VCPU_ID_MASK: Final = 0xFFF


class CompletionMatcher:
    """``kvm_async_pf_completed`` ↔ its token, by gva, in either order.

    :param window_us: a ready whose completion has not come within this time is
        counted in ``ready_without_completed`` and forgotten
    """

    def __init__(self, window_us: int) -> None:
        self.window_us = window_us
        self.completed_to_ready = Histogram()
        self.completed = 0
        self.completed_unmatched = 0
        self.completed_after_ready = 0
        self.ready_without_completed = 0
        # outstanding, not yet completed tokens by gva, oldest first
        self._by_gva: dict[int, list[Token]] = {}
        # readies whose completion was not seen yet: gva → ready times; and all
        # of them as (ready time, gva) in arrival order, to expire them
        self._ready_waiting: dict[int, deque[int]] = {}
        self._waiting_order: deque[tuple[int, int]] = deque()

    def expect(self, token: Token) -> None:
        """A not_present: ``token``'s completion may come."""
        waiting = self._by_gva.get(token.gva)
        if waiting is None:
            self._by_gva[token.gva] = [token]
        else:
            waiting.append(token)

    def forget(self, token: Token) -> None:
        """``token`` was re-announced, flushed or readied: stop matching it."""
        waiting = self._by_gva.get(token.gva)
        if waiting is not None and token in waiting:
            waiting.remove(token)
            if not waiting:
                del self._by_gva[token.gva]

    def on_completed(self, ts_us: int, gva: int) -> None:
        """A completion: the oldest outstanding token with that gva, else the oldest
        ready still waiting for it."""
        self.completed += 1
        waiting = self._by_gva.get(gva)
        if waiting:
            token = waiting.pop(0)
            if not waiting:
                del self._by_gva[gva]
            token.completed_us = ts_us
            return
        readies = self._ready_waiting.get(gva)
        if readies:
            ready_us = readies.popleft()
            if not readies:
                del self._ready_waiting[gva]
            self.completed_after_ready += 1
            self.completed_to_ready.record(ready_us - ts_us)  # negative: recorded as 0
            return
        self.completed_unmatched += 1

    def on_ready(self, ts_us: int, token: Token) -> None:
        """``token`` was readied: completed→ready now, or when its completion comes."""
        if token.completed_us is not None:
            if ts_us < token.completed_us:
                self.completed_after_ready += 1
            self.completed_to_ready.record(ts_us - token.completed_us)
            return
        self.forget(token)
        readies = self._ready_waiting.get(token.gva)
        if readies is None:
            self._ready_waiting[token.gva] = deque((ts_us,))
        else:
            readies.append(ts_us)
        self._waiting_order.append((ts_us, token.gva))
        self._expire(ts_us)

    def _expire(self, now_us: int) -> None:
        order = self._waiting_order
        limit = now_us - self.window_us
        while order and order[0][0] < limit:
            ts_us, gva = order.popleft()
            readies = self._ready_waiting.get(gva)
            if readies and readies[0] == ts_us:
                readies.popleft()
                self.ready_without_completed += 1
                if not readies:
                    del self._ready_waiting[gva]

    def finish(self) -> None:
        """End of observation: readies still waiting never saw their completion."""
        self.ready_without_completed += sum(len(q) for q in self._ready_waiting.values())


class TokenTracker:
    """Starts and ends tokens per vCPU: the not_present and ready events.

    :param vcpus: every vCPU's state by pid (read to name where an unknown
        token is outstanding)
    :param completions: the gva matching of completions
    :param examples: where offending lines are kept
    """

    def __init__(
        self,
        vcpus: Mapping[int, VcpuState],
        completions: CompletionMatcher,
        examples: dict[str, list[str]],
    ) -> None:
        self.not_present_to_ready = Histogram()
        self._vcpus = vcpus
        self._completions = completions
        self._examples = examples

    def on_not_present(self, vcpu: VcpuState, ts_us: int, token: int, gva: int) -> Token:
        """Start ``token`` on ``vcpu``; checks its id and the per-vCPU limit."""
        stats = vcpu.stats
        stats.not_present += 1
        outstanding = vcpu.outstanding
        old = outstanding.get(token)
        if old is not None:
            stats.duplicate_not_present += 1
            add_example(
                self._examples,
                "duplicate_not_present",
                f"{stats.label}: token {token:#x} at {ts_us} us",
            )
            self._completions.forget(old)
        if token in (0, WAKE_ALL_TOKEN) or token & VCPU_ID_MASK != stats.vcpu:
            self._check_vcpu_id(vcpu, ts_us, token)  # a bad token, or the thread's first
        started = Token(token, ts_us, gva)
        outstanding[token] = started
        self._completions.expect(started)
        n = len(outstanding)
        stats.max_outstanding = max(stats.max_outstanding, n)
        if n > MAX_OUTSTANDING_PER_VCPU:
            stats.over_limit += 1
        return started

    def _check_vcpu_id(self, vcpu: VcpuState, ts_us: int, token: int) -> None:
        """A token is never 0 and its low 12 bits are the vCPU id (inferred from
        the first not_present when there is no pid map)."""
        stats = vcpu.stats
        if token in (0, WAKE_ALL_TOKEN):
            stats.bad_token += 1
            add_example(
                self._examples,
                "bad_token",
                f"{stats.label}: not_present token {token:#x} at {ts_us} us",
            )
        elif stats.vcpu is None:
            stats.vcpu = token & VCPU_ID_MASK
        elif token & VCPU_ID_MASK != stats.vcpu:
            stats.bad_token += 1
            add_example(
                self._examples,
                "bad_token",
                f"{stats.label} (pid {stats.pid}): token {token:#x} has id "
                f"{token & VCPU_ID_MASK} at {ts_us} us",
            )

    def on_ready(self, vcpu: VcpuState, ts_us: int, token: int) -> Token | None:
        """End ``token`` on ``vcpu`` (not a wake-all: see :meth:`on_wake_all`).

        :returns: the token, or None when it was not outstanding on ``vcpu``
        """
        stats = vcpu.stats
        stats.ready += 1
        ended = vcpu.outstanding.pop(token, None)
        if ended is None:
            stats.unknown_ready += 1
            where = next(
                (o.stats.label for o in self._vcpus.values() if token in o.outstanding), None
            )
            extra = f" (outstanding on {where})" if where else ""
            add_example(
                self._examples,
                "unknown_ready",
                f"{stats.label}: ready token {token:#x} at {ts_us} us{extra}",
            )
            return None
        self.not_present_to_ready.record(ts_us - ended.not_present_us)
        self._completions.on_ready(ts_us, ended)
        return ended

    def on_wake_all(self, vcpu: VcpuState) -> bool:
        """A wake-all ready: flush ``vcpu``'s outstanding tokens.

        :returns: whether there were any
        """
        stats = vcpu.stats
        stats.ready += 1
        stats.wake_all += 1
        outstanding = vcpu.outstanding
        if not outstanding:
            return False
        stats.flushed += len(outstanding)
        for token in outstanding.values():
            self._completions.forget(token)
        outstanding.clear()
        return True

    def censor(self, vcpus: Iterable[VcpuState], end_us: int | None) -> list[OutstandingToken]:
        """End of observation: the tokens never readied, oldest first, as censored samples."""
        completed_to_ready = self._completions.completed_to_ready
        out: list[OutstandingToken] = []
        for vcpu in vcpus:
            stats = vcpu.stats
            for token in vcpu.outstanding.values():
                since = token.not_present_us
                age = max(0, (end_us or since) - since)
                self.not_present_to_ready.record(age, censored=True)
                completed = token.completed_us
                if completed is not None:
                    completed_to_ready.record((end_us or completed) - completed, censored=True)
                out.append(
                    OutstandingToken(
                        stats.vcpu,
                        stats.pid,
                        token.token,
                        token.gva,
                        since,
                        age,
                        completed is not None,
                    )
                )
        out.sort(key=lambda o: o.since_us)
        return out
