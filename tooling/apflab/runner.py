"""Where and how a run happens: directly on a KVM host, or through the lab.

:func:`run` is what ``apflab run`` / ``make run`` call.  On a host whose
/dev/kvm runs stock guests the experiment runs right here; otherwise the
nested lab is brought up and the very same ``apflab run --here`` runs in L1,
streaming its phases; its results directory is copied back.

:func:`judge` turns a :class:`~apflab.experiment.RunRecord` into the
verdict: trace → analysis → evidence → verdict.json + report.html.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.analysis import lifecycle, parse, verdict
from apflab.errors import ApflabError, LabError
from apflab.experiment import Phases, RunRecord, Scenario, execute
from apflab.host import kvm
from apflab.lab import L1_RESULTS, Lab, LabConfig
from apflab.undo import UndoStack

log = logging.getLogger(__name__)

Emit = Callable[[str], None]


def scenario_argv(s: Scenario, kernel_dir: str | None = None) -> list[str]:
    """The ``apflab run`` options that reproduce ``s`` (kernels mapped into L1)."""

    def kpath(p: Path | None) -> list[str]:
        return [] if p is None else [str(Path(kernel_dir) / p.name) if kernel_dir else str(p)]

    argv = [
        "--image",
        s.image,
        "--guest-memory",
        str(s.guest_memory_mb),
        "--limit",
        str(s.pressure.limit_mb),
        "--swap",
        str(s.pressure.swap_mb),
        "--working-set",
        str(s.workload.mb),
        "--procs",
        str(s.workload.procs),
        "--rounds",
        str(s.workload.rounds),
        "--pattern",
        s.workload.pattern,
        "--pause-ms",
        str(s.workload.pause_ms),
        "--seed",
        str(s.workload.seed),
        "--deadline",
        str(s.deadline_s),
        "--trace-buffer-kb",
        str(s.trace_buffer_kb),
    ]
    if s.guest_cpus is not None:
        argv += ["--guest-cpus", str(s.guest_cpus)]
    if s.pressure.guest_thp is not None:
        argv += ["--guest-thp", "on" if s.pressure.guest_thp else "off"]
    if s.cmdline:
        argv += ["--cmdline", s.cmdline]
    if s.kernel is not None:
        argv += ["--kernel", *kpath(s.kernel)]
    if s.initrd is not None:
        argv += ["--initrd", *kpath(s.initrd)]
    if s.accel:
        argv += ["--accel", s.accel]
    return argv


def point_latest(results_root: Path, run_id: str) -> None:
    latest = results_root / "latest"
    tmp = results_root / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_id)
    tmp.replace(latest)


def run(
    scenario: Scenario,
    results_root: Path,
    emit: Emit,
    run_id: str | None = None,
    here: bool = False,
    lab_config: LabConfig | None = None,
) -> dict[str, Any]:
    """Run one experiment wherever real KVM is; return the verdict document."""
    scenario.validate()  # bad input fails here, in seconds, before any host change
    run_id = run_id or paths.new_run_id()
    results_root.mkdir(parents=True, exist_ok=True)
    out = results_root / run_id
    info = kvm.probe()
    if here or info.usable or scenario.accel == "tcg":
        emit(f"apflab run {run_id}: direct on this host ({info.reason})")
        rec = execute(scenario, out, run_id, emit)
        doc = judge(rec, emit)
    else:
        emit(f"apflab run {run_id}: through the nested lab ({info.reason})")
        doc = _run_in_lab(scenario, results_root, run_id, emit, lab_config or LabConfig())
    point_latest(results_root, run_id)
    return doc


#: how many times the lab itself (L1) may fail before a run gives up: an L1
#: panic under TCG ("TASK stack guard page was hit") says nothing about the
#: kernel under test (docs/calibration.md); every failed attempt is kept.
LAB_ATTEMPTS = 2


def _run_in_lab(
    scenario: Scenario, results_root: Path, run_id: str, emit: Emit, lab_config: LabConfig
) -> dict[str, Any]:
    out = results_root / run_id
    phases = Phases(emit)
    kernels = tuple(p for p in (scenario.kernel, scenario.initrd) if p is not None)
    lab_config = LabConfig(**{**lab_config.__dict__, "kernels": kernels})
    inner = ["apflab", "run", "--here", "--run-id", run_id, "--results", L1_RESULTS]
    inner += scenario_argv(scenario, kernel_dir="/mnt/apflab/kernels")
    failures: list[str] = []
    for attempt in range(1, LAB_ATTEMPTS + 1):
        logs = out / "logs" if attempt == 1 else out / f"logs-lab-attempt{attempt}"
        try:
            lab_facts = _lab_attempt(lab_config, inner, run_id, out, logs, phases, emit)
            break
        except ApflabError as err:
            first = str(err).splitlines()[0]
            failures.append(f"attempt {attempt}: {first}")
            emit(f"          the lab failed (attempt {attempt} of {LAB_ATTEMPTS}): {first}")
            if attempt == LAB_ATTEMPTS:
                failed = error_document(run_id, f"lab: {first}")
                failed["lab"] = {"failures": failures}
                out.mkdir(parents=True, exist_ok=True)
                (out / "verdict.json").write_text(json.dumps(failed, indent=1) + "\n")
                return failed
    vfile = out / "verdict.json"
    if not vfile.exists():
        # the run in L1 failed before judging (e.g. bad input only L1 could see):
        # not a lab failure, so not retried
        raise LabError(
            f"the run in L1 exited {lab_facts['inner_exit_status']} without a verdict.json; "
            "see the output above"
        )
    doc: dict[str, Any] = json.loads(vfile.read_text())
    doc.setdefault("phases_s", {}).update({f"host: {k}": v for k, v in phases.times.items()})
    doc["lab"] = {**lab_facts, "failures": failures}
    vfile.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _lab_attempt(
    lab_config: LabConfig,
    inner: list[str],
    run_id: str,
    out: Path,
    logs: Path,
    phases: Phases,
    emit: Emit,
) -> dict[str, Any]:
    """One lab bring-up + the run inside it + results fetched; raise on lab failure."""
    with UndoStack(f"{run_id}-lab") as undo:
        with phases.phase("lab up (images, assets, L1 boot)"):
            lab = Lab(lab_config, logs, undo)
            lab.up()
        try:
            emit(f"          L1 up in {lab.timings['l1_boot']:.1f}s; {lab.facts['kvm']['reason']}")
            with phases.phase("experiment in L1"):
                res = lab.run(inner, check=False, timeout=None, on_output=_indent(emit))
            with phases.phase("fetch results"):
                n = lab.fetch(f"{L1_RESULTS}/{run_id}", out)
                emit(f"          {n} file(s) copied back to {out}")
        finally:
            with phases.phase("lab down"):
                lab.down()
    return {
        "timings_s": {k: round(v, 1) for k, v in lab.timings.items()},
        "kvm": lab.facts.get("kvm", {}),
        "inner_exit_status": res.exit_status,
    }


def _indent(emit: Emit) -> Callable[[str, str], None]:
    buf = {"stdout": "", "stderr": ""}

    def on_output(stream: str, text: str) -> None:
        buf[stream] += text
        *lines, buf[stream] = buf[stream].split("\n")
        for line in lines:
            emit(f"  L1| {line}")

    return on_output


def error_document(run_id: str, reason: str) -> dict[str, Any]:
    return verdict.error_document(run_id, reason)


def judge(rec: RunRecord, emit: Emit) -> dict[str, Any]:
    """Analyse the trace and the evidence; write verdict.json and report.html."""
    t0 = time.monotonic()
    analysis = None
    thresholds = verdict.Thresholds()
    if rec.trace_path is not None:
        vcpu_of_pid = {tid: idx for idx, tid in rec.vcpus.items()}
        with parse.open_trace(rec.trace_path) as f:
            # the trace ends with our "trace end" marker: the end of observation
            analysis = lifecycle.analyze(
                parse.iter_events(f), vcpu_of_pid=vcpu_of_pid, grace_us=thresholds.grace_us
            )
    evidence = evidence_from_record(rec)
    result = verdict.judge(analysis, evidence, thresholds)
    if analysis is None and not rec.errors and rec.guest.get("accel") == "tcg":
        # A pressure-only run (no KVM): the machinery worked, but there is no
        # async PF to judge. That is never a PASS, and not an infrastructure fault.
        result = dataclasses.replace(
            result,
            verdict=verdict.INVALID,
            reason="pressure-only run under TCG: without KVM there are no async page faults "
            "to judge",
        )
    doc = verdict.verdict_document(
        result,
        analysis,
        evidence,
        thresholds,
        kernel=rec.kernel,
        host=rec.host,
    )
    doc["run_id"] = rec.run_id
    doc["scenario"] = rec.scenario.to_dict()
    doc["pressure"] = rec.pressure
    doc["workload"] = rec.workload.to_dict() if rec.workload else None
    doc["phases_s"] = dict(rec.phases)
    doc["phases_s"]["analysis"] = round(time.monotonic() - t0, 1)
    (rec.results / "verdict.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    from apflab.report import html  # noqa: PLC0415  (matplotlib is heavy)

    t1 = time.monotonic()
    html.write_report(rec.results, doc, analysis)
    doc["phases_s"]["report"] = round(time.monotonic() - t1, 1)
    (rec.results / "verdict.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc


def evidence_from_record(rec: RunRecord) -> verdict.Evidence:
    g = rec.guest
    hyp_before = sum(g.get("hyp_before", []) or [0])
    hyp_after = g.get("hyp_after")
    wl = rec.workload
    return verdict.Evidence(
        lost_events=rec.trace_lost,
        host_swap_out_bytes=int(rec.pressure.get("swap_out_mb", 0) * (1 << 20)),
        hyp_before=hyp_before,
        hyp_after=sum(hyp_after) if hyp_after is not None else None,
        hung_tasks=list(g.get("hung_tasks", [])),
        apf_enabled=bool(g.get("async_pf", {}).get("enabled", False)),
        workload_completed=bool(wl and wl.completed),
        deadline_passed=bool(wl and wl.deadline_passed),
        deadline_s=rec.scenario.deadline_s,
        errors=list(rec.errors),
        guest_faults=list(g.get("console_faults", [])),
        guest_reset=bool(g.get("reset", False)),
        in_lab=bool(rec.host.get("in_lab", False)),
    )
