"""verdict.judge precedence and the verdict.json / analysis document shapes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from apflab.analysis import analyzer, parse, verdict
from apflab.analysis.model import Analysis
from apflab.analysis.thresholds import Thresholds
from apflab.analysis.verdict import Evidence

TRACES = Path(__file__).parent / "fixtures" / "traces"
MAP = {134: 0, 135: 1}
CONTRACT_KEYS = {
    "verdict",
    "reason",
    "kernel",
    "host",
    "events",
    "guest",
    "latency_us",
    "thresholds",
    "invariants",
}
INVARIANTS = {
    "every_not_present_readied",
    "no_ready_for_unknown_token",
    "outstanding_per_vcpu_le_64",
    "token_vcpu_id_matches",
    "interrupt_ready_acked_before_next",
    "hyp_interrupts_match_acks",
    "no_hung_tasks",
    "guest_kernel_healthy",
}
# the lab notes' hung-task line of the no-ACK runs (section 5b)
HUNG = "INFO: task memtouch:61 blocked for more than 120 seconds."

_cache: dict[str, Analysis] = {}


def analysis(name: str, vcpu_of_pid: Mapping[int, int] | None = MAP, **kw: object) -> Analysis:
    key = f"{name}{sorted(kw.items())}"
    if key not in _cache:
        with parse.open_trace(TRACES / name) as f:
            _cache[key] = analyzer.analyze(parse.iter_events(f), vcpu_of_pid, **kw)  # type: ignore[arg-type]
    return _cache[key]


def stock1() -> Analysis:
    return analysis("stock-1-full.trace.xz")


def noack1() -> Analysis:
    # QEMU exited (tracing stopped) at L1 uptime 119.69 s
    return analysis("tiny-noack-1.trace", None, end_ts_us=119_690_000)


def good_evidence(**changes: object) -> Evidence:
    # stock-1 console.log: HYP 1+1 before memtouch, 7961+8026 after; 0 overrun/dropped
    ev = Evidence(
        lost_events=0,
        host_swap_out_bytes=1 << 30,
        hyp_before=2,
        hyp_after=15987,
        hung_tasks=(),
        apf_enabled=True,
        workload_completed=True,
        deadline_s=600,
        workload_seconds=44,
    )
    return dataclasses.replace(ev, **changes)  # type: ignore[arg-type]


def stall_evidence(**changes: object) -> Evidence:
    ev = Evidence(
        lost_events=0,
        host_swap_out_bytes=1 << 27,
        hyp_before=1,
        hyp_after=None,  # the guest hung: its counter could not be read
        hung_tasks=(HUNG,),
        apf_enabled=True,
        workload_completed=False,
        deadline_passed=True,
        deadline_s=100,
    )
    return dataclasses.replace(ev, **changes)  # type: ignore[arg-type]


TH = Thresholds()


# --- PASS and the stall ---------------------------------------------------------------------
def test_healthy_full_trace_passes() -> None:
    v = verdict.judge(stock1(), good_evidence(), TH)
    assert v.verdict == "PASS", v.findings
    assert v.findings == ()
    # HYP delta 15987 - 2 = 15985 vs 15994 ACK writes: difference 9, tolerance 16
    hyp = v.invariants["hyp_interrupts_match_acks"]
    assert hyp.ok and "difference 9" in hyp.detail


def test_no_ack_stall_is_fail_with_the_contract_reason() -> None:
    v = verdict.judge(noack1(), stall_evidence(), TH)
    # youngest of the 5 outstanding: 0x42000, np 13.273004 → 119.69 - 13.273004 = 106.4 s
    assert v.verdict == "FAIL"
    assert v.reason == (
        "page-ready never delivered: 5 tokens outstanding for > 106 s "
        "(workload deadline of 100 s passed)"
    )
    # also recorded: the invariants, the hung task, too few APFs, the unknown HYP count
    text = "\n".join(v.findings)
    for part in ("every_not_present_readied", "no_hung_tasks", "only 66 async PFs", "HYP"):
        assert part in text


def test_stall_without_deadline_uses_stall_threshold() -> None:
    # same trace, workload reported complete: tokens 106+ s old > stall_s (10 s)
    v = verdict.judge(noack1(), stall_evidence(deadline_passed=False, workload_completed=True), TH)
    assert v.verdict == "FAIL" and v.reason.startswith("page-ready never delivered: 5 tokens")


# --- precedence ------------------------------------------------------------------------------
def test_error_beats_everything() -> None:
    v = verdict.judge(noack1(), stall_evidence(errors=("L1 kernel panic",), lost_events=5), TH)
    assert v.verdict == "ERROR" and "L1 kernel panic" in v.reason
    v = verdict.judge(None, good_evidence(), TH)
    assert v.verdict == "ERROR" and v.reason == "no trace to analyse"
    # without a trace there are no ACK writes to count: not a failed invariant
    # (a --trace off run of make bench printed "invariants failed: hyp_interrupts_match_acks")
    hyp = v.invariants[verdict.HYP_INVARIANT]
    assert not hyp.evaluated and hyp.detail.startswith("not evaluated: no trace")


def test_lost_events_beat_the_stall() -> None:
    v = verdict.judge(noack1(), stall_evidence(lost_events=12), TH)
    assert v.verdict == "INVALID" and "12 trace events lost" in v.reason
    v = verdict.judge(stock1(), good_evidence(lost_events=None), TH)
    assert v.verdict == "INVALID" and "loss unknown" in v.reason


def test_stall_beats_invalid_other() -> None:
    # 66 async PFs (< 1000), HYP unknown, workload not completed: still FAIL (stall)
    v = verdict.judge(noack1(), stall_evidence(apf_enabled=None, host_swap_out_bytes=None), TH)
    assert v.verdict == "FAIL"


def test_invariant_failure_beats_invalid_other() -> None:
    # derived-unknown-token: 3 not_present only (< 1000) but a ready for a token never
    # announced is a violation whatever the sample size
    a = analysis("derived-unknown-token.trace")
    v = verdict.judge(a, good_evidence(hyp_after=None), TH)
    assert v.verdict == "FAIL"
    assert v.reason.startswith("invariant no_ready_for_unknown_token failed")
    assert any("only 3 async PFs" in f for f in v.findings)


def test_invalid_other_beats_latency_fail() -> None:
    a = analysis("stock-1-quirk.trace")  # 11 async PFs, ready→ACK max 1665 µs
    # the p99 bound alone (the 11-sample excerpt's p10, 384 µs, is above the floor)
    tight = Thresholds(latency_p10_us={}, latency_p99_us={"ready_to_ack": 1000}, min_tail_samples=1)
    v = verdict.judge(a, good_evidence(hyp_before=0, hyp_after=11), tight)
    assert v.verdict == "INVALID" and "only 11 async PFs" in v.reason
    v = verdict.judge(
        a, good_evidence(hyp_before=0, hyp_after=11), dataclasses.replace(tight, min_async_pf=10)
    )
    assert v.verdict == "FAIL"
    assert v.reason == "ready_to_ack p99 1665 us > 1000 us (11 samples)"


def test_p99_bound_needs_min_tail_samples() -> None:
    # stock-1 (the full trace): 813 queued page-readies, ~16k ready→ACKs
    a = stock1()
    queued = a.latency["queued_completed_to_ready"]
    acks = a.latency["ready_to_ack"]
    assert 0 < queued.count < acks.count
    bounds = {"queued_completed_to_ready": 1, "ready_to_ack": 1}
    # a minimum above the queued count: only ready→ACK's p99 is judged
    tight = dataclasses.replace(TH, latency_p99_us=bounds, min_tail_samples=queued.count + 1)
    v = verdict.judge(a, good_evidence(), tight)
    slow = [f for f in v.findings if " p99 " in f]
    assert v.verdict == "FAIL" and slow == [
        f"ready_to_ack p99 {acks.percentile('99')} us > 1 us ({acks.count} samples)"
    ]
    # at their count the queued ones are judged too
    low = dataclasses.replace(tight, min_tail_samples=queued.count)
    v = verdict.judge(a, good_evidence(), low)
    assert any(f.startswith("queued_completed_to_ready p99 ") for f in v.findings)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"apf_enabled": False}, "not enabled"),
        ({"apf_enabled": None}, "unknown whether async PF"),
        ({"host_swap_out_bytes": 0}, "did not swap"),
        ({"host_swap_out_bytes": None}, "swap-out unknown"),
        ({"workload_completed": False}, "did not complete"),
        ({"workload_completed": False, "deadline_passed": True}, "missed its deadline"),
        ({"hyp_after": None}, "HYP interrupt count is unknown"),
    ],
)
def test_never_pass_on_incomplete_evidence(changes: dict[str, object], words: str) -> None:
    v = verdict.judge(stock1(), good_evidence(**changes), TH)
    assert v.verdict == "INVALID" and words in v.reason


def test_hyp_count_far_from_acks_fails() -> None:
    v = verdict.judge(stock1(), good_evidence(hyp_after=15987 - 100), TH)
    assert v.verdict == "FAIL" and "hyp_interrupts_match_acks" in v.reason


def test_hyp_without_any_ack_fails_even_within_tolerance() -> None:
    # tiny-noack-1 with a made-up HYP delta of 10 (< abs tolerance 16) and 0 ACK writes
    ev = stall_evidence(hyp_after=11, deadline_passed=False, workload_completed=True)
    v = verdict.judge(noack1(), ev, TH)
    assert not v.invariants["hyp_interrupts_match_acks"].ok


def test_hung_task_fails() -> None:
    v = verdict.judge(stock1(), good_evidence(hung_tasks=(HUNG,)), TH)
    assert v.verdict == "FAIL" and "no_hung_tasks" in v.reason and "memtouch" in v.reason


def test_guest_panic_line_fails() -> None:
    # a fatal console line of the kind apflab.vm.qemu.console_faults() collects
    fault = "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009"
    v = verdict.judge(stock1(), good_evidence(guest_faults=(fault,)), TH)
    assert v.verdict == "FAIL"
    assert "guest_kernel_healthy" in v.reason and "Kernel panic" in v.reason
    assert verdict.judge(stock1(), good_evidence(), TH).invariants["guest_kernel_healthy"].ok


def test_silent_guest_reset_fails_on_bare_metal_but_is_invalid_in_the_lab() -> None:
    # a reset seen as runstate "shutdown" (-action reboot=shutdown,shutdown=pause):
    # in the lab it happened to the stock kernel too (docs/calibration.md)
    bare = verdict.judge(stock1(), good_evidence(guest_reset=True), TH)
    assert bare.verdict == "FAIL" and "reset" in bare.reason
    lab = verdict.judge(stock1(), good_evidence(guest_reset=True, in_lab=True), TH)
    assert lab.verdict == "INVALID" and "nested lab" in lab.reason
    assert lab.invariants["guest_kernel_healthy"].ok


# --- documents ---------------------------------------------------------------------------------
def test_verdict_document_schema() -> None:
    a = stock1()
    ev = good_evidence()
    v = verdict.judge(a, ev, TH)
    kernel = {
        "release": "6.1.0-56-cloud-amd64",
        "path": "/k/vmlinuz",
        "sha256": "ab",
        "cmdline": "",
    }
    doc = verdict.verdict_document(v, a, ev, TH, kernel=kernel, host={"path": "lab"})
    json.dumps(doc)  # plain JSON
    assert set(doc) >= CONTRACT_KEYS
    assert doc["verdict"] == "PASS" and doc["reason"] == v.reason
    assert set(doc["kernel"]) == {"release", "path", "sha256", "cmdline"}
    assert doc["host"] == {"path": "lab"}
    assert {"not_present", "ready", "wake_all", "completed", "ack", "lost"} <= set(doc["events"])
    assert doc["events"]["lost"] == 0 and doc["events"]["not_present"] == 16404
    assert {"hyp_interrupts", "hung_tasks"} <= set(doc["guest"])
    assert doc["guest"]["hyp_interrupts"] == 15985 and doc["guest"]["hung_tasks"] == 0
    assert set(doc["latency_us"]) == {
        "not_present_to_ready",
        "completed_to_ready",
        "ready_to_ack",
        "back_to_back_gap",
        "queued_completed_to_ready",  # an addition to the contract
    }
    # the readies an ACK dequeued from KVM's queue (stock-1: 813, waiting p50 384 us)
    assert doc["latency_us"]["queued_completed_to_ready"]["count"] == 813
    for s in doc["latency_us"].values():
        assert {"count", "p50", "p90", "p99", "p999", "max"} <= set(s)
    assert set(doc["invariants"]) == INVARIANTS
    for inv in doc["invariants"].values():
        assert isinstance(inv["ok"], bool) and isinstance(inv["detail"], str)
    assert doc["thresholds"]["min_async_pf"] == 1000
    assert doc["thresholds"]["min_tail_samples"] == 500
    assert doc["halt_path"]["tokens"] == 412
    assert doc["ordering_quirk"]["ack_triggered_ready"] == 813


def test_analysis_document_matches_verdict_parts() -> None:
    a = stock1()
    ev = good_evidence()
    doc = verdict.verdict_document(verdict.judge(a, ev, TH), a, ev, TH)
    part = verdict.analysis_document(a)
    assert set(part) == {"events", "latency_us", "invariants"}
    assert part["latency_us"] == doc["latency_us"]
    assert {k: v for k, v in part["events"].items() if k != "lost"} == {
        k: v for k, v in doc["events"].items() if k != "lost"
    }
    assert part["events"]["lost"] is None
    for name, inv in part["invariants"].items():
        assert doc["invariants"][name] == inv


def test_error_document_has_the_contract_keys() -> None:
    doc = verdict.error_document("run-1", "lab: L1 did not boot")
    json.dumps(doc)
    assert set(doc) >= CONTRACT_KEYS
    assert (doc["verdict"], doc["reason"], doc["run_id"]) == (
        "ERROR",
        "lab: L1 did not boot",
        "run-1",
    )
    assert doc["events"]["not_present"] == 0
