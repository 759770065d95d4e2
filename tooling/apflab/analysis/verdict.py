"""Analysis + evidence → verdict (PASS / FAIL / INVALID / ERROR) and verdict.json.

**Precedence** (the first rule that applies decides; every finding is still
listed in ``findings``):

1. **ERROR** — an infrastructure fault was recorded (``evidence.errors``), or
   there is no trace to analyse.  Nothing can be said about the kernel.
2. **INVALID (lost events)** — the tracer dropped events (or its loss counters
   were not read).  A lost ``kvm_async_pf_ready`` line looks exactly like a
   page-ready that was never delivered, so no FAIL may be built on such a trace.
3. **FAIL (stall)** — the workload deadline passed with page-readies still
   outstanding, or a token is outstanding for longer than
   :attr:`Thresholds.stall_s`: ``page-ready never delivered: N tokens outstanding
   for > T s``.  This is the kernel's fault (the no-ACK negative control looks
   exactly like this), so it beats every "not enough evidence" rule below: a
   stalled guest usually cannot report its HYP counter, and a stall that began
   after 55 async PFs is still a stall.
4. **FAIL (invariant)** — a protocol invariant was violated (unknown token,
   more than 64 outstanding, token/vCPU mismatch, a ready never ACKed or
   delivered back-to-back, HYP interrupts != ACKs, a hung task).  *This departs
   from the suggested order* (INVALID(other) before any FAIL): a violation that
   was observed is a kernel bug however few async PFs the run produced, and the
   INVALID(other) rules are about too little *power* to claim PASS, not about
   doubting what was seen.  Missing evidence never fails an invariant: an
   invariant that cannot be evaluated (HYP counter unknown) is INVALID, below.
5. **INVALID (other)** — the experiment did not test what it should: async PF
   not enabled in the guest, the host did not swap, fewer than
   :attr:`Thresholds.min_async_pf` async PFs, the workload neither completed nor
   stalled, or evidence needed for PASS is missing.  Never PASS on incomplete
   evidence.
6. **FAIL (latency)** — a p10 floor, a p99 or a max latency bound of
   :class:`Thresholds` is exceeded (a p99 bound only on
   :attr:`~Thresholds.min_tail_samples` samples or more).  Statistical, so it
   ranks below INVALID (too few samples make percentiles meaningless).
7. **PASS**.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apflab.analysis.analyzer import analyze
from apflab.analysis.model import METRICS, Analysis, Invariant
from apflab.analysis.thresholds import Thresholds

PASS, FAIL, INVALID, ERROR = "PASS", "FAIL", "INVALID", "ERROR"
#: Invariant names computed here from outside evidence (the rest come from the trace).
HYP_INVARIANT = "hyp_interrupts_match_acks"
HUNG_INVARIANT = "no_hung_tasks"
GUEST_INVARIANT = "guest_kernel_healthy"
_KERNEL_KEYS = ("release", "path", "sha256", "cmdline")
_MAX_LISTED = 64


@dataclass
class Evidence:
    """What the run observed outside the trace.  None means *unknown*.

    :ivar lost_events: events the tracer dropped or overwrote (per-CPU
        ``overrun`` + ``dropped events`` summed)
    :ivar host_swap_out_bytes: bytes the host swapped out of the guest's cgroup
    :ivar host_swap_out_pages: the same in pages, when that is what was read
    :ivar hyp_before: guest HYP interrupts (all CPUs) before the workload
    :ivar hyp_after: the same after the workload
    :ivar hung_tasks: the guest's hung-task report lines (``task ... blocked for
        more than N seconds``)
    :ivar hung_task_count: the number of hung tasks when it differs from
        ``len(hung_tasks)`` (lines truncated); None: ``len(hung_tasks)``
    :ivar apf_enabled: async PF (interrupt delivery) was enabled in the guest
    :ivar workload_completed: the workload finished
    :ivar deadline_passed: the workload was still running at its deadline
    :ivar workload_stalled: the workload was stopped early because a token stayed
        outstanding past the stall bound while the trace streamed
    :ivar deadline_s: that deadline
    :ivar workload_seconds: how long the workload ran
    :ivar errors: infrastructure faults (each one line): the verdict is ERROR
    :ivar guest_faults: the guest kernel's fatal console lines after boot
        (panic, BUG, GP fault)
    :ivar guest_reset: the guest stopped running during the run without such a
        line (a reset: triple fault)
    :ivar in_lab: the run happened inside the nested lab, where a silent guest
        reset is a known failure of QEMU TCG's nested SVM (docs/calibration.md):
        there it makes the run INVALID; on a bare-metal host it is a FAIL
    """

    lost_events: int | None = None
    host_swap_out_bytes: int | None = None
    host_swap_out_pages: int | None = None
    hyp_before: int | None = None
    hyp_after: int | None = None
    hung_tasks: Sequence[str] = ()
    hung_task_count: int | None = None
    apf_enabled: bool | None = None
    workload_completed: bool = False
    deadline_passed: bool = False
    workload_stalled: bool = False
    deadline_s: float | None = None
    workload_seconds: float | None = None
    errors: Sequence[str] = ()
    guest_faults: Sequence[str] = ()
    guest_reset: bool = False
    in_lab: bool = False

    @property
    def hyp_delta(self) -> int | None:
        if self.hyp_before is None or self.hyp_after is None:
            return None
        return self.hyp_after - self.hyp_before

    @property
    def hung(self) -> int:
        return self.hung_task_count if self.hung_task_count is not None else len(self.hung_tasks)

    @property
    def swapped(self) -> bool | None:
        if self.host_swap_out_bytes is not None:
            return self.host_swap_out_bytes > 0
        if self.host_swap_out_pages is not None:
            return self.host_swap_out_pages > 0
        return None


@dataclass(frozen=True)
class Verdict:
    """The judgement: one word, one line why, and everything found on the way.

    :ivar verdict: PASS, FAIL, INVALID or ERROR
    :ivar reason: one line
    :ivar findings: every problem found, in precedence order (``reason`` is the first)
    :ivar invariants: all invariants: the trace ones and the two evidence ones
    """

    verdict: str
    reason: str
    findings: tuple[str, ...]
    invariants: Mapping[str, Invariant]


def _evidence_invariants(
    analysis: Analysis | None, ev: Evidence, th: Thresholds
) -> tuple[dict[str, Invariant], list[str]]:
    """hyp_interrupts_match_acks and no_hung_tasks; plus what could not be evaluated."""
    out: dict[str, Invariant] = {}
    missing: list[str] = []
    acks = analysis.events["ack"] if analysis is not None else 0
    delta = ev.hyp_delta
    if analysis is None:  # no trace (a --trace off run): no ACK count to hold it against
        out[HYP_INVARIANT] = Invariant(
            False,
            f"not evaluated: no trace, so no ACK writes to count (guest HYP interrupts {delta})",
            evaluated=False,
        )
    elif delta is None:
        out[HYP_INVARIANT] = Invariant(
            False,
            f"not evaluated: guest HYP count unknown ({acks} ACK writes in the trace)",
            evaluated=False,
        )
        missing.append("the guest HYP interrupt count is unknown")
    else:
        tol = max(th.hyp_ack_abs_tolerance, int(th.hyp_ack_rel_tolerance * delta))
        ok = abs(acks - delta) <= tol and not (delta > 0 and acks == 0)
        out[HYP_INVARIANT] = Invariant(
            ok,
            f"guest HYP interrupts {delta} (before {ev.hyp_before}, after {ev.hyp_after}) vs "
            f"{acks} ACK writes: difference {acks - delta}, tolerance ±{tol}",
        )
    n = ev.hung
    detail = f"{n} hung task report(s)"
    if ev.hung_tasks:
        detail += f": {ev.hung_tasks[0].strip()}"
    out[HUNG_INVARIANT] = Invariant(n == 0, detail)
    faults = list(ev.guest_faults)
    if ev.guest_reset and not ev.in_lab:
        faults.append("the guest reset (triple fault?) during the run")
    if faults:
        detail = f"{len(faults)} fault(s): {faults[0]}"
    elif ev.guest_reset:
        detail = "no kernel message; the guest reset silently (nested lab: not judged, see INVALID)"
    else:
        detail = "no panic, BUG or reset during the run"
    out[GUEST_INVARIANT] = Invariant(not faults, detail)
    return out, missing


def _error_findings(analysis: Analysis | None, ev: Evidence) -> list[str]:
    """Precedence 1: infrastructure faults, or no trace at all."""
    errors = [f"infrastructure: {e}" for e in ev.errors]
    if analysis is None and not errors:
        errors.append("no trace to analyse")
    return errors


def _loss_findings(ev: Evidence) -> list[str]:
    """Precedence 2: the tracer lost events (or nobody read its counters)."""
    if ev.lost_events is None:
        return ["trace loss unknown: the tracer's overrun/dropped counters were not read"]
    if ev.lost_events > 0:
        return [f"{ev.lost_events} trace events lost (buffer overrun): trace incomplete"]
    return []


def _stall(analysis: Analysis, ev: Evidence, th: Thresholds) -> str | None:
    """Precedence 3: page-readies never delivered (the deadline passed with tokens
    outstanding, or one is older than the stall threshold)."""
    outs = analysis.outstanding_at_end
    if not outs:
        return None
    stall_us = int(th.stall_s * 1_000_000)
    old = [o for o in outs if o.age_us > stall_us]
    if ev.deadline_passed:
        chosen = outs
    elif old:
        chosen = old
    else:
        return None
    youngest = min(o.age_us for o in chosen)
    t = youngest // 1_000_000
    why = ""
    if ev.deadline_passed:
        why = "workload deadline passed"
        if ev.deadline_s is not None:
            why = f"workload deadline of {ev.deadline_s:g} s passed"
    elif ev.workload_stalled:
        why = "stall seen while tracing: the workload was stopped"
    reason = f"page-ready never delivered: {len(chosen)} tokens outstanding for > {t} s"
    return f"{reason} ({why})" if why else reason


def _invariant_findings(invariants: Mapping[str, Invariant], ev: Evidence) -> list[str]:
    """Precedence 4: violated invariants (one that could not be evaluated is not
    violated: it makes the run INVALID instead)."""
    return [
        f"invariant {name} failed: {inv.detail}"
        for name, inv in invariants.items()
        if not (inv.ok or (name == HYP_INVARIANT and ev.hyp_delta is None))
    ]


def _invalid_findings(
    analysis: Analysis, ev: Evidence, th: Thresholds, missing: list[str], stalled: bool
) -> list[str]:
    """Precedence 5: the run did not test what it should, or evidence is missing."""
    invalid: list[str] = []
    if ev.guest_reset and ev.in_lab and not ev.guest_faults:
        invalid.append(
            "the guest reset during the workload with no kernel message: a known failure "
            "of the nested lab (TCG nested SVM), not evidence about the kernel; rerun"
        )
    if ev.apf_enabled is None:
        invalid.append("unknown whether async PF was enabled in the guest")
    elif not ev.apf_enabled:
        invalid.append("async PF was not enabled in the guest: nothing was tested")
    if ev.swapped is None:
        invalid.append("host swap-out unknown")
    elif not ev.swapped:
        invalid.append("the host did not swap the guest out: no async PF pressure")
    if analysis.async_pfs < th.min_async_pf:
        invalid.append(
            f"only {analysis.async_pfs} async PFs (< {th.min_async_pf}): too little to judge"
        )
    if not ev.workload_completed and not stalled:
        if ev.deadline_passed:
            invalid.append("the workload missed its deadline with no page-ready outstanding")
        else:
            invalid.append("the workload did not complete")
    invalid.extend(f"incomplete evidence: {m}" for m in missing)
    return invalid


def _latency_failures(analysis: Analysis, th: Thresholds) -> list[str]:
    """Precedence 6: the latency bounds: floors (p10) first, then p99 and max."""
    out = []
    for metric in METRICS:
        h = analysis.latency[metric]
        if h.count == 0:
            continue
        floor = th.latency_p10_us.get(metric)
        p10 = h.percentile("10")
        if floor is not None and p10 is not None and p10 > floor:
            what = "the ACK comes late on every page-ready: " if metric == "ready_to_ack" else ""
            out.append(f"{what}{metric} p10 {p10} us > {floor} us ({h.count} samples)")
    for metric in METRICS:
        h = analysis.latency[metric]
        if h.count == 0:
            continue
        bound = th.latency_p99_us.get(metric)
        p99 = h.percentile("99") if h.count >= th.min_tail_samples else None
        if bound is not None and p99 is not None and p99 > bound:
            out.append(f"{metric} p99 {p99} us > {bound} us ({h.count} samples)")
        mbound = th.latency_max_us.get(metric)
        if mbound is not None and h.max is not None and h.max > mbound:
            cens = f", {h.censored} censored" if h.censored else ""
            out.append(f"{metric} max {h.max} us > {mbound} us{cens}")
    return out


def judge(analysis: Analysis | None, evidence: Evidence, thresholds: Thresholds) -> Verdict:
    """Apply the precedence of the module doc.

    :param analysis: the trace analysis; None when there is no trace (ERROR)
    """
    ev, th = evidence, thresholds
    invariants: dict[str, Invariant] = dict(analysis.invariants) if analysis else {}
    extra, missing = _evidence_invariants(analysis, ev, th)
    invariants.update(extra)
    stall: list[str] = []
    failed_inv: list[str] = []
    invalid: list[str] = []
    slow: list[str] = []
    if analysis is not None:
        s = _stall(analysis, ev, th)
        stall = [s] if s else []
        failed_inv = _invariant_findings(invariants, ev)
        invalid = _invalid_findings(analysis, ev, th, missing, stalled=bool(stall))
        slow = _latency_failures(analysis, th)
    order = (
        (ERROR, _error_findings(analysis, ev)),
        (INVALID, _loss_findings(ev)),
        (FAIL, stall),
        (FAIL, failed_inv),
        (INVALID, invalid),
        (FAIL, slow),
    )
    findings = tuple(f for _, group in order for f in group)
    for word, group in order:
        if group:
            return Verdict(word, group[0], findings, invariants)
    n = analysis.async_pfs if analysis else 0
    return Verdict(
        PASS,
        f"{n} async PFs: all invariants hold and latencies are within bounds",
        findings,
        invariants,
    )


def _events_part(analysis: Analysis, lost: int | None) -> dict[str, Any]:
    e = analysis.events
    return {
        "not_present": e["not_present"],
        "ready": e["ready"],
        "wake_all": e["wake_all"],
        "completed": e["completed"],
        "ack": e["ack"],
        "lost": lost,
        "interrupt_ready": e["interrupt_ready"],
        "halt_ready": e["halt_ready"],
        "ack_triggered_ready": e["ack_triggered_ready"],
        "back_to_back": e["back_to_back"],
        "outstanding_at_end": e["outstanding_at_end"],
        "unacked_at_end": e["unacked_at_end"],
    }


def analysis_document(analysis: Analysis, lost: int | None = None) -> dict[str, Any]:
    """``{"events", "latency_us", "invariants"}`` of one analysis (``apflab analyze
    --json``); the same numbers as in :func:`verdict_document`.  ``lost`` comes from
    the tracer's counters (the run's run.json), None when unknown: the trace text
    alone cannot know what it lost."""
    return {
        "events": _events_part(analysis, lost),
        "latency_us": {m: analysis.latency[m].summary() for m in METRICS},
        "invariants": {k: v.to_dict() for k, v in analysis.invariants.items()},
    }


def _censored_part(analysis: Analysis) -> dict[str, Any]:
    return {
        "outstanding_at_end": [
            {
                "vcpu": o.vcpu,
                "pid": o.pid,
                "token": f"{o.token:#x}",
                "gva": f"{o.gva:#x}",
                "age_us": o.age_us,
                "completed": o.completed,
            }
            for o in analysis.outstanding_at_end[:_MAX_LISTED]
        ],
        "unacked_at_end": [
            {"vcpu": u.vcpu, "pid": u.pid, "token": f"{u.token:#x}", "age_us": u.age_us}
            for u in analysis.unacked_at_end[:_MAX_LISTED]
        ],
        "count": {m: analysis.latency[m].censored for m in METRICS},
    }


def verdict_document(
    result: Verdict,
    analysis: Analysis | None,
    evidence: Evidence,
    thresholds: Thresholds,
    *,
    kernel: Mapping[str, Any] | None = None,
    host: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The verdict.json document (contract keys first; additions after them).

    :param kernel: ``release``, ``path``, ``sha256``, ``cmdline`` (missing ones are
        None; other keys are kept)
    :param host: free-form facts about the host/lab, copied as is
    """
    a = analysis if analysis is not None else analyze(())
    part = analysis_document(a)
    kern: dict[str, Any] = {k: None for k in _KERNEL_KEYS}
    kern.update(kernel or {})
    doc: dict[str, Any] = {
        "verdict": result.verdict,
        "reason": result.reason,
        "kernel": kern,
        "host": dict(host or {}),
        "events": _events_part(a, evidence.lost_events),
        "guest": {
            "hyp_interrupts": evidence.hyp_delta,
            "hung_tasks": evidence.hung,
            "hyp_before": evidence.hyp_before,
            "hyp_after": evidence.hyp_after,
            "hung_task_lines": list(evidence.hung_tasks)[:_MAX_LISTED],
            "apf_enabled": evidence.apf_enabled,
        },
        "latency_us": part["latency_us"],
        "thresholds": thresholds.to_dict(),
        "invariants": {k: v.to_dict() for k, v in result.invariants.items()},
        # additions to the contract
        "findings": list(result.findings),
        "workload": {
            "completed": evidence.workload_completed,
            "deadline_passed": evidence.deadline_passed,
            "stalled": evidence.workload_stalled,
            "deadline_s": evidence.deadline_s,
            "seconds": evidence.workload_seconds,
        },
        "halt_path": {
            "tokens": a.events["halt_path_tokens"],
            "ready": a.events["halt_ready"],
            "not_present_to_ready": a.halt_path_latency.summary(),
        },
        "classification": {
            "method": a.classification,
            "detail": a.classification_detail,
            "vcpu_ids": a.vcpu_ids,
            "interrupt_path_tokens": a.events["interrupt_path_tokens"],
            "halt_path_tokens": a.events["halt_path_tokens"],
            "unresolved_at_end": a.events["unresolved_at_end"],
        },
        "ordering_quirk": {
            "ack_triggered_ready": a.events["ack_triggered_ready"],
            "ready_line_to_ack_line_us": a.ack_triggered_lead.summary(),
        },
        "censored": _censored_part(a),
        "counters": dict(a.events),
        "vcpus": [dataclasses.asdict(s) for s in a.vcpus],
        "trace": {"start_us": a.start_us, "end_us": a.end_us, "grace_us": a.grace_us},
        "errors": list(evidence.errors),
    }
    return doc


def error_document(run_id: str, reason: str) -> dict[str, Any]:
    """A verdict.json for a run that ended in an infrastructure fault before any
    analysis (same keys as :func:`verdict_document`; verdict ERROR)."""
    ev = Evidence(errors=(reason,))
    th = Thresholds()
    result = judge(None, ev, th)
    doc = verdict_document(result, None, ev, th)
    doc["reason"] = reason
    doc["run_id"] = run_id
    return doc
