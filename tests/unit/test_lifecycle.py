"""analyzer.analyze on real trace excerpts; every expected number is worked out by hand
from the fixture lines (timestamps in seconds as printed; differences in µs)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from apflab.analysis import analyzer, classify, invariants, model, parse, summary
from apflab.analysis.model import Analysis
from apflab.analysis.state import add_example
from apflab.analysis.stats import Histogram
from apflab.analysis.timeline import TimelineBuilder
from apflab.errors import AnalysisError

TRACES = Path(__file__).parent / "fixtures" / "traces"
MAP = {134: 0, 135: 1}  # stock-1/stock-2: tid 134 = CPU 0, 135 = CPU 1 (console.log)
# tiny-noack-1: QEMU exited (and tracing stopped) at L1 uptime 119.69 s (console.log)
NOACK1_END_US = 119_690_000


def run(name: str, vcpu_of_pid: Mapping[int, int] | None = None, **kw: object) -> Analysis:
    with parse.open_trace(TRACES / name) as f:
        return analyzer.analyze(parse.iter_events(f), vcpu_of_pid, **kw)  # type: ignore[arg-type]


def samples(h: Histogram) -> list[int]:
    """The recorded values (exact below 2048 µs), one per sample, sorted."""
    out: list[int] = []
    for b in h.buckets():
        assert b.low == b.high or b.samples == 1, "only for exact values"
        out += [b.high] * b.samples
    return out


def failed(a: Analysis) -> set[str]:
    return {k for k, v in a.invariants.items() if not v.ok}


# --- hand-checked lifecycles ------------------------------------------------------------------
def test_head_halt_path_tokens_and_wake_all() -> None:
    # The excerpt holds no kvm_inj_exception line (stock-1 traced them, but none occurs
    # before line 851): auto-detection falls back to the heuristic, so force "pf" here.
    assert run("stock-1-head.trace", MAP).classification == "heuristic"
    a = run("stock-1-head.trace", MAP, classification="pf")
    # four tokens on pid 135 (lines 18/19/20, 22/23/24, 26/27/28, 30/31/32):
    #   0x1001: np 22.435703, completed 22.436089, ready 22.436505 → np→r 802, c→r 416
    #   0x2001: np 22.437776, completed 22.438027, ready 22.438109 → 333, 82
    #   0x3001: np 24.702929, completed 24.703410, ready 24.703496 → 567, 86
    #   0x4001: np 24.703878, completed 24.704096, ready 24.704194 → 316, 98
    assert samples(a.latency["not_present_to_ready"]) == [316, 333, 567, 802]
    assert samples(a.latency["completed_to_ready"]) == [82, 86, 98, 416]
    s = a.latency["not_present_to_ready"].summary()
    # nearest rank, N=4: p50 → rank 2 → 333; p90 → rank ceil(3.6)=4 → 802
    assert (s["count"], s["p50"], s["p90"], s["max"]) == (4, 333, 802, 802)
    # no #PF follows any of them: halt-path (no interrupt, no ACK expected). Three are
    # settled by the next try_async_get_page, 0x4001 by the end of the excerpt.
    e = a.events
    assert (e["halt_path_tokens"], e["interrupt_path_tokens"], e["unresolved_at_end"]) == (4, 0, 1)
    assert (e["halt_ready"], e["interrupt_ready"]) == (4, 0)
    # wake-all readies (token 0xffffffff, lines 13, 15) are counted apart, never "unknown",
    # and are interrupt-delivered: ACKs at 8.089627 - 7.833805 = 255822 and
    # 8.635268 - 8.634810 = 458
    assert (e["wake_all"], e["unknown_ready"], e["ready"], e["ack"]) == (2, 0, 6, 2)
    h = a.latency["ready_to_ack"]
    assert (h.count, h.min, h.max, h.censored) == (2, 458, 255_822, 0)
    assert failed(a) == set()
    assert [v.label for v in a.vcpus] == ["vCPU 0", "vCPU 1"]
    assert [v.max_outstanding for v in a.vcpus] == [0, 1]


def test_quirk_ack_triggered_ready_is_not_back_to_back() -> None:
    a = run("stock-1-quirk.trace", MAP)
    e = a.events
    # 11 tokens 0x63001..0x6d001, each followed by its own "#PF (0x0)": interrupt-path
    assert (e["not_present"], e["interrupt_path_tokens"], e["pf_injected"]) == (11, 11, 11)
    # lines 63-66 (stock-1 909-912):
    #   909 ready 0x6d001 32.493357 (delivered with the #PF at 910)
    #   911 ready 0x6c001 32.493846  ← logged while KVM handled the ACK of 0x6d001
    #   912 ACK           32.493862  (kvm_msr comes after the handling)
    #   913 ACK           32.494292  (the ACK of 0x6c001)
    assert (e["ack_triggered_ready"], e["back_to_back"], e["unacked_at_end"]) == (1, 0, 0)
    assert samples(a.ack_triggered_lead) == [16]  # 32.493862 - 32.493846
    # 0x6c001 is the queued page-ready: its page completed at 32.493269 (line 62) and it
    # waited in KVM's queue until the ACK of 0x6d001 dequeued it at 32.493846
    assert samples(a.latency["queued_completed_to_ready"]) == [577]
    # ready→ACK, each ACK to the oldest un-ACKed ready:
    #   0x63001 .449917→.451582 1665   0x64001 .462792→.463558 766
    #   0x65001 .465398→.465955 557    0x66001 .469313→.470308 995
    #   0x67001 .473509→.474086 577    0x68001 .478419→.479629 1210
    #   0x69001 .481349→.482032 683    0x6a001 .485011→.485369 358
    #   0x6b001 .487947→.488331 384    0x6d001 .493357→.493862 505
    #   0x6c001 .493846→.494292 446    (naive "ready just before the ACK" would say 16)
    r2a = [358, 384, 446, 505, 557, 577, 683, 766, 995, 1210, 1665]
    assert samples(a.latency["ready_to_ack"]) == r2a
    s = a.latency["ready_to_ack"].summary()
    # N=11: p50 → rank ceil(5.5)=6 → 577; p90 → rank ceil(9.9)=10 → 1210; p99 → 11 → 1665
    assert (s["p50"], s["p90"], s["p99"], s["max"]) == (577, 1210, 1665, 1665)
    # 0x6c001: np 32.490712 → ready 32.493846 = 3134 µs, the slowest of the 11
    assert a.latency["not_present_to_ready"].max == 3134
    assert "interrupt_ready_acked_before_next" not in failed(a)
    assert failed(a) == set()


def test_completed_matched_by_gva_in_arrival_order() -> None:
    a = run("stock-1-quirk.trace", MAP)
    # lines 907/908: completed gva 0x4800000 (0x6d001) at .493201, then gva 0x2a72010
    # (0x6c001) at .493269; readies at .493357 and .493846 → 156 and 577
    c2r = samples(a.latency["completed_to_ready"])
    assert 156 in c2r and 577 in c2r and len(c2r) == 11
    assert a.events["completed_unmatched"] == 0


def test_mixed_interrupt_and_halt_path() -> None:
    a = run("stock-1-mixed.trace", MAP)
    e = a.events
    # 0xb0001, 0xb1001, 0xb4001 get a #PF (lines 5, 9, 26); 0xb2001 and 0xb3001 do not
    # (their not_present is followed by completed, ready, then try_async_get_page)
    assert (e["interrupt_path_tokens"], e["halt_path_tokens"]) == (3, 2)
    assert (e["interrupt_ready"], e["halt_ready"], e["ack"]) == (3, 2, 3)
    # ready→ACK: .342491→.342912 421, .344942→.345202 260, .354131→.354365 234
    assert samples(a.latency["ready_to_ack"]) == [234, 260, 421]
    # halt-path not_present→ready: .346386→.347741 1355, .348206→.348973 767
    assert samples(a.halt_path_latency) == [767, 1355]
    assert e["pf_reinjected"] == 1 and e["unacked_at_end"] == 0
    assert failed(a) == set()


def test_completed_after_ready_either_order() -> None:
    a = run("stock-1-completed-after-ready.trace", MAP)
    # np 65.151762, ready 65.154666, completed 65.154730 (64 µs AFTER the ready,
    # kworker on the other CPU), ACK 65.157388
    assert samples(a.latency["not_present_to_ready"]) == [2904]
    assert samples(a.latency["completed_to_ready"]) == [0]  # clamped, counted below
    assert a.events["completed_after_ready"] == 1
    assert a.events["completed_unmatched"] == 0
    assert samples(a.latency["ready_to_ack"]) == [2722]


def test_wake_all_flushes_outstanding_tokens() -> None:
    # derived: stock-1 lines 17-18 (np 0x1001 on pid 135) then its wake-all line 15 with
    # the time set to 22.436505: the re-enable after a disable that flushed the queue
    a = run("derived-wake-all-flush.trace", MAP)
    e = a.events
    assert (e["flushed"], e["outstanding_at_end"], e["unknown_ready"], e["wake_all"]) == (
        1,
        0,
        0,
        1,
    )
    assert "1 flushed" in a.invariants["every_not_present_readied"].detail
    assert a.invariants["every_not_present_readied"].ok


def test_cpu_comm_trace_with_map() -> None:
    a = run("stock-2-cpu-comm.trace", MAP)
    # stock-2 lines 18/19/20: 0x1001 np 14.287752, completed 14.289102, ready 14.289453
    assert 1701 in samples(a.latency["not_present_to_ready"])
    assert [v.label for v in a.vcpus] == ["vCPU 0", "vCPU 1"]
    assert a.vcpu_ids == "map"
    assert a.invariants["token_vcpu_id_matches"].ok


# --- censoring ----------------------------------------------------------------------------------
def test_outstanding_at_end_is_censored_with_its_age() -> None:
    # derived: stock-1 head cut after line 30 (np 0x4001 at 24.703878, no ready)
    a = run("derived-cut-after-not-present.trace", MAP, end_ts_us=24_704_194)
    # end at the time its ready has in the full trace → age 316, the real latency
    (o,) = a.outstanding_at_end
    assert (o.token, o.age_us, o.completed) == (0x4001, 316, False)
    h = a.latency["not_present_to_ready"]
    assert (h.count, h.censored, h.max) == (4, 1, 802)
    assert a.invariants["every_not_present_readied"].ok  # younger than the 1 s grace
    late = run("derived-cut-after-not-present.trace", MAP, end_ts_us=30_000_000)
    # 30.000000 - 24.703878 = 5.296122 s > 1 s grace
    assert late.latency["not_present_to_ready"].max == 5_296_122
    assert not late.invariants["every_not_present_readied"].ok
    assert "0x4001" in late.invariants["every_not_present_readied"].detail


def test_a_stall_never_looks_fast() -> None:
    a = run("tiny-noack-1.trace", end_ts_us=NOACK1_END_US)
    s = a.latency["not_present_to_ready"].summary()
    # 66 not_present; 5 never readied. The oldest, 0x3d000 (np 11.392013), is
    # 119.690000 - 11.392013 = 108.297987 s old at the end. p99: rank ceil(65.34)=66 → it.
    assert (s["count"], s["censored"]) == (66, 5)
    assert s["p99"] == s["max"] == 108_297_987
    # their pages had completed: completed→ready is censored too
    assert a.latency["completed_to_ready"].censored == 5
    # measured only up to the last event (13.273265), it would look 57x shorter
    short = run("tiny-noack-1.trace")
    assert short.latency["not_present_to_ready"].max == 13_273_265 - 11_392_013


# --- every invariant's failing case -----------------------------------------------------------
def test_never_readied_tokens_real_no_ack_capture() -> None:
    a = run("tiny-noack-1.trace", end_ts_us=NOACK1_END_US)
    # grep -c: 66 not_present, 62 ready (1 wake-all), 0 kvm_msr
    e = a.events
    assert (e["not_present"], e["ready"], e["wake_all"], e["ack"]) == (66, 62, 1, 0)
    assert [hex(o.token) for o in a.outstanding_at_end] == [
        "0x3d000",
        "0x3f000",
        "0x40000",
        "0x41000",
        "0x42000",
    ]
    assert all(o.completed for o in a.outstanding_at_end)
    assert failed(a) == {"every_not_present_readied", "interrupt_ready_acked_before_next"}


def test_back_to_back_readies_real_no_ack_capture() -> None:
    a = run("tiny-noack-1.trace", end_ts_us=NOACK1_END_US)
    e = a.events
    # 79 kvm_inj_exception lines, 15 "[reinjected]": 64 #PF injections
    assert e["pf_injected"] == 64
    # no ACK ever: every interrupt-path ready after the first wake-all (7.687782) is
    # delivered while an earlier one is un-ACKed: 61 of 61
    assert (e["interrupt_ready"], e["back_to_back"], e["ack_triggered_ready"]) == (61, 61, 0)
    # first gap: ready 0x1000 at 10.860034 - wake-all 7.687782 = 3172252
    assert a.latency["back_to_back_gap"].max == 3_172_252
    assert e["unacked_at_end"] == 62
    assert not a.invariants["interrupt_ready_acked_before_next"].ok


def test_second_no_ack_capture_fails_the_same_way() -> None:
    # tiny-noack-2: QEMU exited at L1 uptime 156.97 s (console.log)
    a = run("tiny-noack-2.trace", end_ts_us=156_970_000)
    assert a.events["ack"] == 0 and a.events["outstanding_at_end"] == 4
    assert failed(a) == {"every_not_present_readied", "interrupt_ready_acked_before_next"}


def test_unknown_token_derived() -> None:
    # derived: stock-1 head with line 18 (np 0x1001) deleted
    a = run("derived-unknown-token.trace", MAP)
    assert a.events["unknown_ready"] == 1
    assert "0x1001" in a.invariants["no_ready_for_unknown_token"].detail
    assert a.events["completed_unmatched"] == 1  # its completion has no token either
    assert failed(a) == {"no_ready_for_unknown_token"}


def test_more_than_64_outstanding_derived() -> None:
    # derived: the first 65 not_present lines of pid 135 (readies removed by the grep)
    a = run("derived-65-outstanding.trace", MAP)
    assert a.vcpus[0].max_outstanding == 65
    assert not a.invariants["outstanding_per_vcpu_le_64"].ok
    first_64 = (TRACES / "derived-65-outstanding.trace").read_text().splitlines()[:64]
    b = analyzer.analyze(parse.iter_events(first_64), MAP)
    assert b.vcpus[0].max_outstanding == 64
    assert b.invariants["outstanding_per_vcpu_le_64"].ok


def test_token_vcpu_mismatch_and_zero_token_derived() -> None:
    # derived: stock-1 head with token 0x2001 → 0x2002 and 0x3001 → 0
    for vmap in (MAP, None):
        a = run("derived-bad-token.trace", vmap)
        assert a.events["bad_token"] == 2
        assert failed(a) == {"token_vcpu_id_matches"}
    assert "inferred" in run("derived-bad-token.trace").invariants["token_vcpu_id_matches"].detail
    # the real, unedited excerpt under a swapped pid map: all 4 tokens (id 1) mismatch vCPU 0
    a = run("stock-1-head.trace", {134: 1, 135: 0})
    assert a.events["bad_token"] == 4 and not a.invariants["token_vcpu_id_matches"].ok


def test_missing_ack_makes_back_to_back_derived() -> None:
    # derived: the quirk excerpt with line 12 (the ACK of 0x64001 at 32.463558) deleted.
    # 0x65001's ready (32.465398) then comes while 0x64001 (32.462792) is un-ACKed and its
    # next event is a #PF, not an ACK: back-to-back, gap 2606.
    a = run("derived-missing-ack.trace", MAP)
    assert a.events["back_to_back"] >= 1
    assert a.latency["back_to_back_gap"].min == 2606
    assert a.events["ack"] == 10
    assert not a.invariants["interrupt_ready_acked_before_next"].ok


def test_unacked_ready_at_end_derived() -> None:
    # derived: the quirk excerpt without its last line (the ACK of 0x6c001, ready 32.493846)
    near = run("derived-last-ack-missing.trace", MAP)
    assert near.events["unacked_at_end"] == 1
    assert near.latency["ready_to_ack"].censored == 1
    assert near.invariants["interrupt_ready_acked_before_next"].ok  # 16 µs old: in grace
    far = run("derived-last-ack-missing.trace", MAP, end_ts_us=34_000_000)
    # 34.000000 - 32.493846 = 1.506154 s > 1 s grace
    assert far.latency["ready_to_ack"].max == 1_506_154
    assert not far.invariants["interrupt_ready_acked_before_next"].ok


# --- classification without #PF events ------------------------------------------------------
def test_heuristic_classification_without_pf_events() -> None:
    a = run("derived-no-pf-events.trace", MAP)
    assert a.classification == model.CLASSIFICATION_HEURISTIC
    assert "heuristic" in a.classification_detail
    assert "not assessed" in a.invariants["interrupt_ready_acked_before_next"].detail
    # same pairing as with the #PF events (test_quirk_...): quirk recognised by timing
    assert samples(a.latency["ready_to_ack"]) == [
        358,
        384,
        446,
        505,
        557,
        577,
        683,
        766,
        995,
        1210,
        1665,
    ]
    assert a.events["ack_triggered_ready"] == 1
    b = run("derived-mixed-no-pf-events.trace", MAP)
    # 0xb2001/0xb3001: the vCPU faulted again (try_async_get_page) with their ready
    # un-ACKed → halt-path, as the #PF events said
    assert (b.events["interrupt_ready"], b.events["halt_ready"]) == (3, 2)
    assert samples(b.latency["ready_to_ack"]) == [234, 260, 421]


def test_forced_classification_and_bad_value() -> None:
    assert run("stock-1-quirk.trace", classification="pf").classification == "pf"
    with pytest.raises(ValueError, match="classification"):
        run("stock-1-quirk.trace", classification="guess")


# --- misc ---------------------------------------------------------------------------------------
def test_foreign_pids_are_ignored_with_a_map() -> None:
    a = run("stock-1-head.trace", {135: 1})
    # pid 134 logged a wake-all ready and an ACK (lines 13, 14)
    assert a.events["foreign"] == 2
    assert (a.events["wake_all"], a.events["ack"]) == (1, 1)
    assert [v.label for v in a.vcpus] == ["vCPU 1"]


def test_header_only_trace() -> None:
    a = run("header-only.trace")
    assert a.events["not_present"] == 0 and a.start_us is None and a.end_us is None
    assert failed(a) == set()
    assert a.latency["not_present_to_ready"].summary()["p50"] is None


def test_full_trace_end_to_end() -> None:
    a = run("stock-1-full.trace.xz", MAP, max_timeline_bins=64)
    # auto-detection looks past the 194 halt-path faults of the boot to the first #PF
    assert a.classification == "pf"
    e = a.events
    # stock-1.run.out and the capture helper's analysis.json: 16404 not_present, 16406
    # ready (2 wake-all), 15994 ACKs, 15992 non-reinjected #PF → 412 halt-path tokens
    assert (e["not_present"], e["ready"], e["wake_all"], e["ack"]) == (16404, 16406, 2, 15994)
    assert (e["pf_injected"], e["interrupt_path_tokens"], e["halt_path_tokens"]) == (
        15992,
        15992,
        412,
    )
    # every ACK pairs with an interrupt-delivered ready: 15992 + 2 wake-all = 15994
    assert (e["interrupt_ready"] + e["wake_all"], e["ack_unmatched"]) == (15994, 0)
    # the ~5% "back-to-back" readies of a healthy run are all the ordering quirk
    assert (e["ack_triggered_ready"], e["back_to_back"]) == (813, 0)
    assert failed(a) == set()
    assert all(len(s) <= 64 for s in a.timeline.series.values())
    assert max(max(s) for s in a.timeline.series.values()) == 2


# --- analyze_trace and the small pieces --------------------------------------------------------
def test_analyze_trace_reads_parses_and_analyzes() -> None:
    for name in ("stock-1-mixed.trace", "stock-1-full.trace.xz"):
        a, stats = analyzer.analyze_trace(TRACES / name, MAP, grace_us=500_000)
        want = run(name, MAP, grace_us=500_000)
        assert a.events == want.events and a.grace_us == 500_000
        assert a.invariants == want.invariants
        assert {m: h.summary() for m, h in a.latency.items()} == {
            m: h.summary() for m, h in want.latency.items()
        }
        counted = parse.ParseStats()
        with parse.open_trace(TRACES / name) as f:
            for _ in parse.iter_events(f, counted):
                pass
        assert stats == counted
    _, stats = analyzer.analyze_trace(TRACES / "stock-1-head.trace")
    assert (stats.lines, stats.header, stats.events, stats.malformed) == (32, 12, 20, 0)


def test_analyze_trace_missing_file_raises_analysis_error(tmp_path: Path) -> None:
    with pytest.raises(AnalysisError, match="cannot open trace"):
        analyzer.analyze_trace(tmp_path / "nope.trace")


def test_event_counts_sum_the_vcpus() -> None:
    a = run("stock-1-head.trace", MAP)
    total = summary.sum_counts(a.vcpus)
    assert (total.pid, total.vcpu) == (0, None)
    assert total.ready == sum(v.ready for v in a.vcpus) == a.events["ready"] == 6
    assert total.try_get_page == a.events["try_async_get_page"]


def test_format_duration() -> None:
    assert invariants.format_duration(999_999) == "1000.0 ms"
    assert invariants.format_duration(1_000_000) == "1.000 s"
    assert invariants.format_duration(12_345) == "12.3 ms"


def test_timeline_bins_double_and_keep_the_maximum() -> None:
    tl = TimelineBuilder(max_bins=4, initial_bin_us=10)
    tl.t0_us = 100
    s = tl.new_series()
    for ts, n in ((100, 1), (105, 3), (112, 2), (125, 0), (139, 5)):
        tl.record(s, ts, n)
    # a bin is the maximum while it lasts, the level carried in included:
    # [100,110) 1→3, [110,120) 3→2, [120,130) 2→0, [130,140) 0→5
    assert (tl.bin_us, s.bins) == (10, [3, 3, 2, 5])
    tl.record(s, 140, 4)  # bin 4 does not exist: bins become 20 µs wide
    assert (tl.bin_us, s.bins) == (20, [3, 5, 5])  # [140,160) starts at 5
    tl.record(s, 90, 6)  # a line logged before the first one: bin 0
    assert s.bins == [6, 5, 5]
    built = tl.build([("vCPU 0", s)], end_us=180)  # 180 is in bin 4: 40 µs wide
    assert (built.t0_us, built.bin_us, built.series) == (100, 40, {"vCPU 0": [6, 5, 6]})


def test_add_example_keeps_the_first_few() -> None:
    examples: dict[str, list[str]] = {}
    for i in range(5):
        add_example(examples, "problem", f"line {i}")
    assert examples == {"problem": ["line 0", "line 1", "line 2"]}


def test_detect_without_events_is_pf() -> None:
    assert classify.detect(iter(())) == ("pf", "", [])
