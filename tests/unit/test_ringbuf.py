"""The raw ring-buffer decoder (apflab.analysis.ringbuf) on a real capture read both
ways: ``record-1`` is one lab run's ring buffer read as text (``trace``) and then as
pages (``trace_pipe_raw``), the same events (fixtures/traces/README.md)."""

from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from apflab.analysis import ringbuf
from apflab.analysis.analyzer import analyze_trace
from apflab.analysis.parse import Kind, ParseStats, iter_events, open_trace
from apflab.errors import AnalysisError

F = Path(__file__).parent / "fixtures" / "traces" / "record-1"
RAW, TEXT = F / "trace.raw", F / "trace.txt.xz"


def text_events() -> tuple[list, ParseStats]:
    stats = ParseStats()
    with open_trace(TEXT) as f:
        return list(iter_events(f, stats)), stats


def test_raw_pages_decode_to_the_events_of_the_text() -> None:
    raw_stats = ParseStats()
    raw = list(ringbuf.iter_raw_events(RAW, raw_stats))
    text, text_stats = text_events()
    assert len(raw) > 40_000
    assert raw == text  # every field of every event, in order
    assert raw_stats.markers == text_stats.markers
    assert raw_stats.events == text_stats.events


def test_every_kind_is_in_the_capture() -> None:
    kinds = Counter(e.kind for e in ringbuf.iter_raw_events(RAW))
    for kind in (Kind.NOT_PRESENT, Kind.READY, Kind.COMPLETED, Kind.TRY_GET_PAGE, Kind.ACK):
        assert kinds[kind] > 1000, kind
    assert kinds[Kind.PF] > 1000
    assert kinds[Kind.MARKER] >= 3  # trace start, workload start, stall checks


def test_the_analysis_of_both_is_the_same() -> None:
    a_raw, _ = analyze_trace(RAW)
    a_text, _ = analyze_trace(TEXT)
    assert a_raw.events == a_text.events
    assert a_raw.invariants == a_text.invariants
    assert {m: h.summary() for m, h in a_raw.latency.items()} == {
        m: h.summary() for m, h in a_text.latency.items()
    }
    assert (a_raw.start_us, a_raw.end_us) == (a_text.start_us, a_text.end_us)


def test_count_agrees_with_the_decoder() -> None:
    formats, files = ringbuf.read_capture(RAW)
    pages = [ringbuf.read_pages(p) for p in files.values()]
    c = ringbuf.count(pages, formats)
    kinds = Counter(e.kind for e in ringbuf.iter_raw_events(RAW))
    assert (c.not_present, c.ready) == (kinds[Kind.NOT_PRESENT], kinds[Kind.READY])
    last = max(e.ts_us for e in ringbuf.iter_raw_events(RAW))
    assert c.last_ts_us == last


def test_the_formats_name_the_page_layout() -> None:
    formats, _ = ringbuf.read_capture(RAW)
    assert (formats.page_size, formats.commit_offset, formats.data_offset) == (4096, 8, 16)
    assert formats.id_of("print") is not None


def test_a_directory_without_formats_is_not_a_capture(tmp_path: Path) -> None:
    assert not ringbuf.is_capture(tmp_path)
    with pytest.raises(AnalysisError, match="not a raw trace capture"):
        list(ringbuf.iter_raw_events(tmp_path))


def test_a_compressed_capture_decodes_the_same(tmp_path: Path) -> None:
    capture = tmp_path / "trace.raw"
    capture.mkdir()
    (capture / ringbuf.FORMATS).write_bytes((RAW / ringbuf.FORMATS).read_bytes())
    (capture / "cpu0.pages").write_bytes(ringbuf.read_pages(RAW / "cpu0.pages.xz"))
    before = list(ringbuf.iter_raw_events(capture))
    assert ringbuf.compress_capture(capture) > 0
    assert sorted(p.name for p in capture.iterdir()) == ["cpu0.pages.xz", ringbuf.FORMATS]
    assert list(ringbuf.iter_raw_events(capture)) == before
    assert ringbuf.compress_capture(capture) == 0  # judged again: nothing left to do


LOSSY = Path(__file__).parent / "fixtures" / "traces" / "flood-lossy-l0"


def test_lossy_pages_decode_and_say_how_much_was_lost() -> None:
    # 4 KB per CPU, 20,000 markers/s: the kernel overwrote 56,160 events (its overrun
    # counters: 34,465 + 21,695) and flagged 15 pages RB_MISSED_EVENTS with the count
    # stored after the page's events; its flags arrive sign-extended (commit bits 31-63)
    formats, files = ringbuf.read_capture(LOSSY)
    commits = [
        int.from_bytes(data[i + 8 : i + 16], "little")
        for data in (ringbuf.read_pages(p) for p in files.values())
        for i in range(0, len(data), formats.page_size)
    ]
    flagged = [c for c in commits if c & ringbuf.MISSED_EVENTS]
    assert len(flagged) == 15
    assert all(c >> 31 == (1 << 33) - 1 for c in flagged)  # sign-extended
    stats = ParseStats()
    events = list(ringbuf.iter_raw_events(LOSSY, stats))
    assert len(events) == 2183 + 1485  # the counters' "read events": every one kept
    assert {e.kind for e in events} == {Kind.MARKER}
    assert stats.unparsed == 0  # no stored count read as an event
    assert (stats.lost_marks, stats.lost_counted) == (15, 34_465 + 21_695)
    assert stats.lost_at_least() == 56_160
    # two CPUs' pages merged on the trace clock, as trace_pipe merges them
    assert {e.cpu for e in events} == {0, 1}
    assert all(a.ts_us <= b.ts_us for a, b in pairwise(events))


def test_a_capture_without_loss_marks_none() -> None:
    stats = ParseStats()
    for _ in ringbuf.iter_raw_events(RAW, stats):
        pass
    assert (stats.lost_marks, stats.lost_counted) == (0, 0)


LAB_LOSSY = Path(__file__).parent / "fixtures" / "traces" / "lossy-4k-1" / "trace.raw"


def test_a_lossy_lab_capture_decodes_to_its_events_only() -> None:
    # the nested lab's 6.1 with 4 KB per CPU (verdict INVALID, 33,024 lost): 10 of these
    # 110 pages are flagged, 6 with the count stored after their events. Read as a page
    # length, the sign-extended flags made the decoder walk into that count and the
    # zeros after it (make bench crashed on such a page, 2026-12-03)
    formats, files = ringbuf.read_capture(LAB_LOSSY)
    data = ringbuf.read_pages(files[0])
    page = formats.page_size
    page43 = data[43 * page : 44 * page]  # flagged, 142 events, then the count 143
    commit = int.from_bytes(page43[8:16], "little")
    assert commit & ringbuf.MISSED_EVENTS and commit & ringbuf.MISSED_STORED
    assert commit & ringbuf.COMMIT_BYTES == 4056
    assert len(list(ringbuf.page_events(page43, formats))) == 142
    assert int.from_bytes(page43[16 + 4056 : 16 + 4064], "little") == 143
    stats = ParseStats()
    kinds = Counter(e.kind for e in ringbuf.iter_raw_events(LAB_LOSSY, stats))
    assert stats.unparsed == 0  # every event decoded is one of ours
    assert sum(kinds.values()) == 7991
    assert (stats.lost_marks, stats.lost_counted) == (10, 856)
    assert kinds[Kind.NOT_PRESENT] == 1308 and kinds[Kind.ACK] == 1207
    analysis, _ = analyze_trace(LAB_LOSSY)  # and it analyses (a loss shows in its invariants)
    assert analysis.events["not_present"] == 1308


@pytest.mark.parametrize("capture", [LAB_LOSSY, LOSSY])
def test_a_capture_read_in_chunks_decodes_as_read_whole(capture: Path) -> None:
    """Files are read as a stream of whole pages (memory bounded by the chunk): any
    chunk size gives the events, counters and loss marks of the whole file."""
    formats, files = ringbuf.read_capture(capture)
    whole_stats, chunked_stats = ParseStats(), ParseStats()
    whole = list(
        ringbuf.decode(formats, {c: ringbuf.read_pages(p) for c, p in files.items()}, whole_stats)
    )
    chunks = {c: ringbuf.iter_pages(p, formats.page_size, pages=7) for c, p in files.items()}
    assert all(len(c) % formats.page_size == 0 for c in ringbuf.iter_pages(files[0], 4096, 7))
    assert list(ringbuf.decode(formats, chunks, chunked_stats)) == whole
    assert whole and chunked_stats == whole_stats
    assert whole_stats.lost_marks > 0
