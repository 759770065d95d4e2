"""Live stall detection on real traces, streamed into a file as the tracer writes it."""

from pathlib import Path

import pytest

from apflab.analysis import ringbuf
from apflab.analysis.parse import open_trace
from apflab.run.stall import Stalled, StallWatch

TRACES = Path(__file__).parent / "fixtures" / "traces"


def stream(trace: Path, tmp_path: Path, chunk: int = 4096) -> StallWatch:
    """Append the trace to a file in chunks (cut mid-line, as trace_pipe reads are),
    polling the watch after each one; the marker writes nothing (no tracefs here)."""
    with open_trace(trace) as f:
        data = f.read().encode()
    out = tmp_path / "trace.txt"
    out.write_bytes(b"")
    watch = StallWatch(out, lambda text: None, None, stall_s=10.0)
    for i in range(0, len(data), chunk):
        with out.open("ab") as f:
            f.write(data[i : i + chunk])
        watch.poll()
    return watch


def test_the_no_ack_kernel_is_caught_while_the_trace_streams(tmp_path: Path) -> None:
    # tiny-noack-2: token 0x1e000 is never readied (not_present at 15.537849); the next
    # event comes 140 s later, and that is when the watch sees the stall
    with pytest.raises(Stalled, match=r"token 0x1e000 on vCPU 0 outstanding for 140\.4 s"):
        stream(TRACES / "tiny-noack-2.trace", tmp_path)


def test_a_healthy_run_never_stalls(tmp_path: Path) -> None:
    watch = stream(TRACES / "stock-1-full.trace.xz", tmp_path, chunk=1 << 16)
    assert watch.found is None
    # page-readies kept coming: the counts never suspected a stall, so the trace was
    # never analysed while it streamed (what made the first watch expensive in L1)
    assert watch.confirmations == 0


def test_the_stall_is_confirmed_by_one_analysis(tmp_path: Path) -> None:
    # tiny-noack-2 in 4 KB pieces: the counts suspect the stall at the first poll after
    # the 140 s gap, and one analysis of the whole trace confirms it and names the token
    with open_trace(TRACES / "tiny-noack-2.trace") as f:
        data = f.read().encode()
    out = tmp_path / "trace.txt"
    out.write_bytes(b"")
    watch = StallWatch(out, lambda text: None, None, stall_s=10.0)
    with pytest.raises(Stalled):
        for i in range(0, len(data), 4096):
            with out.open("ab") as f:
                f.write(data[i : i + 4096])
            watch.poll()
    assert watch.confirmations == 1


def stream_raw(capture: Path, tmp_path: Path, pages_per_poll: int = 4) -> StallWatch:
    """A raw capture replayed as the reader hands it over: its pages appended to a
    capture directory and fed to the watch a few at a time, polling after each."""
    formats, files = ringbuf.read_capture(capture)
    out = tmp_path / "trace.raw"
    out.mkdir()
    (out / ringbuf.FORMATS).write_bytes((capture / ringbuf.FORMATS).read_bytes())
    watch = StallWatch(out, lambda text: None, None, stall_s=10.0)
    assert watch.raw
    step = formats.page_size * pages_per_poll
    for cpu, path in files.items():
        data = ringbuf.read_pages(path)
        for i in range(0, len(data), step):
            with (out / f"cpu{cpu}.pages").open("ab") as f:
                f.write(data[i : i + step])
            watch.feed_pages(cpu, data[i : i + step])
            watch.poll()
    return watch


def test_a_healthy_raw_capture_never_stalls(tmp_path: Path) -> None:
    watch = stream_raw(TRACES / "record-1" / "trace.raw", tmp_path)
    assert watch.found is None
    assert watch.confirmations == 0


def test_the_no_ack_kernel_is_caught_in_a_raw_capture(tmp_path: Path) -> None:
    # noack-raw-1: the run that the raw stall watch stopped in the lab (token 0x5d000,
    # 10.8 s), replayed: the same token, confirmed by one analysis
    with pytest.raises(Stalled, match=r"token 0x5d000 on vCPU 0 outstanding for 1\d\.\d s"):
        stream_raw(TRACES / "noack-raw-1" / "trace.raw", tmp_path, pages_per_poll=1)
