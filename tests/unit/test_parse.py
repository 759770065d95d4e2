"""parse.py on real trace lines (fixtures/traces/README.md says where each came from)."""

from __future__ import annotations

import gzip
import lzma
import shutil
from pathlib import Path

import pytest

from apflab.analysis import parse
from apflab.analysis.parse import NO_TOKEN, Event, Kind, ParseStats
from apflab.errors import AnalysisError

TRACES = Path(__file__).parent / "fixtures" / "traces"


def lines(name: str) -> list[str]:
    return (TRACES / name).read_text().splitlines(keepends=True)


def events(name: str, stats: ParseStats | None = None) -> list[Event]:
    return list(parse.iter_events(lines(name), stats))


# --- single lines ---------------------------------------------------------------------------
def test_not_present_line() -> None:
    line = lines("stock-1-head.trace")[17]  # stock-1 line 18
    assert "kvm_async_pf_not_present: token 0x1001 gva 0x177fd000" in line
    assert parse.parse_line(line) == Event(22_435_703, 135, 0, Kind.NOT_PRESENT, 0x1001, 0x177FD000)


def test_completed_line_has_no_token_and_kworker_pid() -> None:
    # "     kworker/0:1-17      [000] .....    22.436089: kvm_async_pf_completed: gva ..."
    ev = parse.parse_line(lines("stock-1-head.trace")[18])
    assert ev == Event(22_436_089, 17, 0, Kind.COMPLETED, NO_TOKEN, 0x177FD000)


def test_wake_all_ready_line() -> None:
    ev = parse.parse_line(lines("stock-1-head.trace")[12])  # stock-1 line 13
    assert ev is not None
    assert (ev.kind, ev.token, ev.gva, ev.pid, ev.cpu) == (Kind.READY, 0xFFFFFFFF, 0, 134, 1)
    assert ev.ts_us == 7_833_805


def test_ack_line_and_other_msrs() -> None:
    ack = lines("stock-1-head.trace")[13]  # kvm_msr: msr_write 4b564d07 = 0x1
    ev = parse.parse_line(ack)
    assert ev is not None and ev.kind is Kind.ACK and ev.ts_us == 8_089_627
    # the same real line with another MSR, a read, a zero write, a faulted write: not ACKs
    assert parse.parse_line(ack.replace("4b564d07", "4b564d02")) is None
    assert parse.parse_line(ack.replace("msr_write", "msr_read")) is None
    assert parse.parse_line(ack.replace("= 0x1", "= 0x0")) is None
    assert parse.parse_line(ack.rstrip("\n") + " (#GP)\n") is None


def test_pf_and_reinjected_pf_lines() -> None:
    q = lines("stock-1-mixed.trace")
    assert parse.parse_line(q[8]) == Event(33_344_193, 135, 0, Kind.PF, NO_TOKEN, 0)
    assert parse.parse_line(q[9]) == Event(33_344_212, 135, 0, Kind.PF_REINJECTED, NO_TOKEN, 0)
    # another exception vector (the real line with #PF replaced) is not kept
    assert parse.parse_line(q[8].replace("#PF", "#GP")) is None


def test_try_async_get_page_line() -> None:
    ev = parse.parse_line(lines("stock-1-head.trace")[16])  # gva = 0x177fd000, gfn = 0x177fd
    assert ev == Event(22_435_444, 135, 0, Kind.TRY_GET_PAGE, NO_TOKEN, 0x177FD000)


def test_real_cpu_comm_with_space_slash_and_need_resched_flag() -> None:
    # stock-2 ran QEMU with debug-threads=on: "       CPU 0/KVM-134     [000] .N...     9.09..."
    ev = parse.parse_line(lines("stock-2-cpu-comm.trace")[12])
    assert ev == Event(9_092_988, 134, 0, Kind.READY, 0xFFFFFFFF, 0)
    ev = parse.parse_line(lines("stock-2-cpu-comm.trace")[17])
    assert ev == Event(14_287_752, 135, 0, Kind.NOT_PRESENT, 0x1001, 0x3F8F000)


def test_comm_substitution_gives_identical_events() -> None:
    # derived-cpu-comm-from-stock-1 = stock-1-mixed with "qemu-system-x86-135" → "CPU 1/KVM-135"
    assert events("derived-cpu-comm-from-stock-1.trace") == events("stock-1-mixed.trace")


def test_pid_is_digits_after_last_dash() -> None:
    line = lines("stock-1-mixed.trace")[1].replace("qemu-system-x86-135", "a-b-7/KVM-4711")
    ev = parse.parse_line(line)
    assert ev is not None and ev.pid == 4711 and ev.token == 0xB0001


def test_layout_variants_without_flags_and_with_tgid() -> None:
    real = lines("stock-1-mixed.trace")[1]
    want = parse.parse_line(real)
    assert want is not None
    no_flags = real.replace(" ..... ", " ")  # trace without the irq-info option
    tgid = real.replace("135     [000]", "135     (    129) [000]")  # options/record-tgid
    assert parse.parse_line(no_flags) == want
    assert parse.parse_line(tgid) == want
    assert events_of([no_flags, tgid]) == [want, want]


def events_of(text_lines: list[str]) -> list[Event]:
    return list(parse.iter_events(text_lines))


def test_marker_line_is_a_timestamp() -> None:
    real = lines("stock-1-head.trace")[19]
    marker = real.split(": kvm_")[0] + ": tracing_mark_write: apflab: tracing stopped\n"
    ev = parse.parse_line(marker)
    assert ev is not None and ev.kind is Kind.MARKER and ev.ts_us == 22_436_505
    assert events_of([marker]) == [ev]


# --- streams ----------------------------------------------------------------------------------
def test_iter_events_counts_header_lines() -> None:
    st = ParseStats()
    evs = events("stock-1-head.trace", st)
    # 32 lines: 12 "#" header lines + 20 events (wc -l / grep -c '^#')
    assert (st.lines, st.header, st.events, st.unparsed, st.malformed) == (32, 12, 20, 0, 0)
    assert len(evs) == 20
    assert [e.kind for e in evs[:4]] == [Kind.READY, Kind.ACK, Kind.READY, Kind.ACK]


def test_iter_events_matches_parse_line_on_every_real_line() -> None:
    for name in ("stock-2-cpu-comm.trace", "stock-1-quirk.trace", "tiny-noack-1.trace"):
        one_by_one = [e for e in map(parse.parse_line, lines(name)) if e is not None]
        assert events(name) == one_by_one


def test_unknown_event_and_garbage_are_unparsed() -> None:
    real = lines("stock-1-head.trace")[16]
    other_event = real.replace("kvm_try_async_get_page", "kvm_exit")
    st = ParseStats()
    assert events_of([other_event, "not a trace line\n"]) == []
    assert list(parse.iter_events([other_event, "not a trace line\n"], st)) == []
    assert (st.unparsed, st.malformed) == (2, 0)


def test_truncated_line_is_counted_malformed_not_raised() -> None:
    real = lines("stock-1-head.trace")[17]  # ...not_present: token 0x1001 gva 0x177fd000
    cut = real[: real.index(" gva")] + "\n"  # as a torn last line of trace_pipe
    st = ParseStats()
    assert list(parse.iter_events([cut, real], st)) == [parse.parse_line(real)]
    assert (st.malformed, st.unparsed, st.events) == (1, 1, 1)
    assert st.first_malformed == cut.rstrip("\n")
    with pytest.raises(ValueError, match="malformed"):
        parse.parse_line(cut)


def test_stats_are_flushed_when_the_consumer_stops_early() -> None:
    st = ParseStats()
    it = parse.iter_events(lines("stock-1-head.trace"), st)
    next(it)
    it.close()
    assert st.lines == 13 and st.header == 12 and st.events == 1


def test_timestamps_are_integer_microseconds() -> None:
    evs = events("stock-1-quirk.trace")
    assert evs[0].ts_us == 32_448_896  # "32.448896"
    assert all(isinstance(e.ts_us, int) for e in evs)


# --- files ------------------------------------------------------------------------------------
def test_open_trace_plain_gz_xz(tmp_path: Path) -> None:
    plain = TRACES / "stock-1-mixed.trace"
    gz = tmp_path / "t.trace.gz"
    with plain.open("rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    xz = tmp_path / "t.trace.xz"
    xz.write_bytes(lzma.compress(plain.read_bytes()))
    want = events("stock-1-mixed.trace")
    for path in (plain, gz, xz):
        with parse.open_trace(path) as f:
            assert list(parse.iter_events(f)) == want


def test_open_trace_missing_file_raises_analysis_error(tmp_path: Path) -> None:
    with pytest.raises(AnalysisError, match="cannot open trace"):
        parse.open_trace(tmp_path / "nope.trace")


def test_full_xz_trace_counts_match_grep() -> None:
    # grep -c " kvm_async_pf_not_present:" etc. on stock-1/trace.txt (stock-1.run.out)
    st = ParseStats()
    with parse.open_trace(TRACES / "stock-1-full.trace.xz") as f:
        kinds: dict[Kind, int] = {}
        for e in parse.iter_events(f, st):
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
    assert kinds[Kind.NOT_PRESENT] == 16404
    assert kinds[Kind.COMPLETED] == 16404
    assert kinds[Kind.READY] == 16406
    assert kinds[Kind.ACK] == 15994
    assert kinds[Kind.TRY_GET_PAGE] == 16453
    assert kinds[Kind.REPEATED_FAULT] == 49
    # 19474 kvm_inj_exception lines: 3482 carry " [reinjected]"
    assert kinds[Kind.PF] + kinds[Kind.PF_REINJECTED] == 19474
    assert kinds[Kind.PF_REINJECTED] == 3482
    assert (st.events, st.header, st.unparsed) == (101184, 12, 0)


def test_lost_lines_are_counted_not_parsed() -> None:
    # trace_pipe's own note where its reader lost events (a real 4 KB-buffer capture)
    stats = ParseStats()
    with (TRACES / "flood-lossy-l0.trace").open() as f:
        events = list(parse.iter_events(f, stats))
    assert len(events) == 456 - 3
    assert {e.kind for e in events} == {Kind.MARKER}
    assert (stats.lost_marks, stats.lost_counted) == (3, 226 + 791 + 904)
    assert (stats.header, stats.unparsed) == (3, 0)
