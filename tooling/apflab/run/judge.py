"""A run's judgement: record → trace analysis + evidence → verdict → verdict.json, report.html.

The rules themselves are pure (:mod:`apflab.analysis.verdict`); this module
feeds them a :class:`~apflab.run.records.RunRecord` and writes the results.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from apflab import __version__, paths
from apflab.analysis import ringbuf, verdict
from apflab.analysis.analyzer import analyze_trace
from apflab.analysis.guest import WORKLOAD_START, guest_view
from apflab.analysis.model import Analysis
from apflab.errors import AnalysisError
from apflab.report import html
from apflab.run.records import RunRecord, vcpu_of_pid, write_json

log = logging.getLogger(__name__)


def evidence(rec: RunRecord) -> verdict.Evidence:
    """What the run observed outside the trace, as the verdict rules read it."""
    g = rec.guest
    wl = rec.workload
    return verdict.Evidence(
        lost_events=rec.trace.lost,
        host_swap_out_bytes=rec.pressure.swap_out_bytes,
        hyp_before=sum(g.hyp_before) if g.hyp_before is not None else None,
        hyp_after=sum(g.hyp_after) if g.hyp_after is not None else None,
        hung_tasks=list(g.hung_tasks),
        apf_enabled=g.async_pf.enabled if g.async_pf is not None else False,
        workload_completed=bool(wl and wl.completed),
        deadline_passed=bool(wl and wl.deadline_passed),
        workload_stalled=bool(wl and wl.stalled),
        workload_seconds=wl.seconds if wl else None,
        deadline_s=rec.scenario.deadline,
        errors=list(rec.errors),
        guest_faults=list(g.console_faults),
        guest_reset=g.reset,
        in_lab=rec.host.in_lab,
    )


def _workload_part(rec: RunRecord) -> dict[str, Any] | None:
    """The workload in verdict.json: each round's stall list stays in workload.jsonl."""
    if rec.workload is None:
        return None
    doc = rec.workload.to_dict()
    doc["rounds"] = [{k: v for k, v in r.items() if k != "stalls"} for r in doc["rounds"]]
    return doc


def judge(rec: RunRecord, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Analyse the trace and the evidence; write report.html and verdict.json.

    :param extra: more top-level keys for verdict.json (the lab's facts)
    """
    t0 = time.monotonic()
    thresholds = rec.scenario.verdict_bounds(rec.host.in_lab)
    analysis: Analysis | None = None
    workload_start: int | None = None
    if rec.trace.path is not None:
        if ringbuf.is_capture(rec.trace.path):
            ringbuf.compress_capture(rec.trace.path)  # here: L1's CPU is the guest's
        # the trace ends with our "trace end" marker: the end of observation
        analysis, stats = analyze_trace(
            rec.trace.path, vcpu_of_pid(rec.vcpus), grace_us=thresholds.grace_us
        )
        workload_start = stats.marker(WORKLOAD_START)
    guest = guest_view(rec.workload.rounds if rec.workload else (), workload_start)
    ev = evidence(rec)
    if analysis is not None and ev.lost_events is not None:
        # the trace's own loss marks count too, should the counters have missed one
        ev = dataclasses.replace(ev, lost_events=max(ev.lost_events, stats.lost_at_least()))
    result = verdict.judge(analysis, ev, thresholds)
    if analysis is None and not rec.errors and rec.guest.accel == "tcg":
        # A pressure-only run (no KVM): the machinery worked, but there is no
        # async PF to judge. That is never a PASS, and not an infrastructure fault.
        result = dataclasses.replace(
            result,
            verdict=verdict.INVALID,
            reason="pressure-only run under TCG: without KVM there are no async page faults "
            "to judge",
        )
    if analysis is None and not rec.errors and rec.guest.console_faults:
        # no trace to judge (TCG, or tracing off), but the kernel under test died or
        # reported a fatal error on its console: that is the kernel's FAIL
        first = rec.guest.console_faults[0]
        result = dataclasses.replace(
            result,
            verdict=verdict.FAIL,
            reason=f"the guest kernel failed during the run: {first}",
            findings=(*result.findings, f"guest console: {first}"),
        )
    if rec.guest.boot_failure:
        # the kernel under test itself did not boot the image: no trace, no run
        word = verdict.FAIL if rec.guest.boot_panic else verdict.INVALID
        what = "panicked while booting" if rec.guest.boot_panic else "did not boot to a login"
        result = dataclasses.replace(
            result,
            verdict=word,
            reason=f"the kernel under test {what}: {rec.guest.boot_failure}",
            findings=(f"the kernel under test {what}: {rec.guest.boot_failure}",),
        )
    kernel = dataclasses.asdict(rec.kernel) if rec.kernel else None
    doc = verdict.verdict_document(
        result, analysis, ev, thresholds, kernel=kernel, host=dataclasses.asdict(rec.host)
    )
    doc["run_id"] = rec.run_id
    doc["apflab"] = {
        "version": __version__,
        "commit": paths.repo_commit(),
        "machine": os.uname().nodename,  # where it was judged: this host, not L1
        "started_at": rec.started_at,
    }
    doc["scenario"] = rec.scenario.to_dict()
    doc["pressure"] = rec.pressure.to_dict()
    doc["workload"] = _workload_part(rec)
    doc["guest_view"] = guest.summary()
    doc["retries"] = rec.retries
    doc.update(extra or {})
    doc["phases_s"] = dict(rec.phases)
    doc["phases_s"]["analysis"] = round(time.monotonic() - t0, 1)
    t1 = time.monotonic()
    try:
        html.write_report(rec.results, doc, analysis, guest)
    except AnalysisError as err:  # the verdict stands without its report
        log.error("report: %s", err)
        doc["report_error"] = str(err)
    doc["phases_s"]["report"] = round(time.monotonic() - t1, 1)
    write_json(rec.results / "verdict.json", doc)
    return doc
