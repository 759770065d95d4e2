"""Binary trace → events: the ring-buffer pages of tracefs ``per_cpu/cpuN/trace_pipe_raw``.

Reading ``trace_pipe`` makes the kernel format every event as text in the
reader's context; in the nested lab that is L1's only emulated vCPU, the one the
guest runs on, and it was most of the tracer's cost (docs/performance.md,
"observer").  ``trace_pipe_raw`` hands over the ring buffer's own pages instead,
no formatting at all; this module decodes them, on the outer host, into the
same :class:`~apflab.analysis.parse.Event` s the text parser makes (the unit
tests check both on one capture read both ways).

A raw capture is a directory (:data:`FORMATS`, ``cpuN.pages``):

* ``formats.txt`` — the ``format`` files of the events traced, plus
  ``events/header_page`` and ``ftrace/print`` (the ``trace_marker`` lines):
  event ids and field offsets are read from it, never assumed;
* ``cpuN.pages`` (or ``.pages.xz``) — what ``read()`` of CPU N's ``trace_pipe_raw`` returned:
  whole pages, each a ``buffer_data_page`` (u64 time stamp, commit = bytes of
  events + flags, then the events).

Each event starts with a 32-bit header (``type_len:5, time_delta:27``, the
kernel's ``struct ring_buffer_event``): type_len 1-28 is a data event of
``4 * type_len`` bytes, 0 a data event whose length follows, 29 padding (a
discarded event, or the rest of the page), 30 a time extend, 31 an absolute
time stamp.  Times are on the instance's clock (``global``: ns); a line of
``trace`` shows them rounded to µs, and so does :attr:`Event.ts_us` here.
"""

from __future__ import annotations

import heapq
import lzma
import re
import struct
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

try:
    from mypy_extensions import i64  # mypyc's native int (a plain int when not compiled)
except ImportError:  # L1's venv has only the runtime dependencies
    i64 = int  # type: ignore[misc]

from apflab.analysis.parse import (
    ACK_MSR,
    MAX_MARKERS,
    NO_TOKEN,
    WAKE_ALL_TOKEN,
    Event,
    Kind,
    ParseStats,
)
from apflab.errors import AnalysisError

#: the formats file of a raw capture
FORMATS: Final = "formats.txt"
#: the pages of CPU N
PAGES: Final = "cpu{}.pages"
#: the ftrace event that ``trace_marker`` writes
PRINT_EVENT: Final = "print"
#: a page's commit: its bytes of events are the bits below the flags ``RB_MISSED_STORED``
#: (bit 30: the count of lost events follows the events) and ``RB_MISSED_EVENTS`` (bit 31:
#: events were lost before this page).  The kernel adds the flags to a 64-bit ``local_t``
#: as ints, so bit 31 comes sign-extended: every bit from 31 up is set (seen in the lab)
COMMIT_BYTES: Final = (1 << 30) - 1
MISSED_STORED: Final = 1 << 30
MISSED_EVENTS: Final = 1 << 31
_TS_SHIFT: Final = 27
_TS_MSB: Final = 0x1F << 59
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_new_event: Final = tuple.__new__
_NP: Final = Kind.NOT_PRESENT
_READY: Final = Kind.READY
_COMPLETED: Final = Kind.COMPLETED
_REPEATED: Final = Kind.REPEATED_FAULT
_TRY: Final = Kind.TRY_GET_PAGE
_ACK: Final = Kind.ACK
_PF: Final = Kind.PF
_PF_RE: Final = Kind.PF_REINJECTED
_MARK: Final = Kind.MARKER


@dataclass(frozen=True)
class Field:
    offset: int
    size: int


@dataclass(frozen=True)
class EventFormat:
    name: str
    id: int
    fields: dict[str, Field]


@dataclass(frozen=True)
class Formats:
    """What a capture's ``formats.txt`` says: the page layout and each event's fields."""

    page_size: int
    commit_offset: int
    commit_size: int
    data_offset: int
    events: dict[str, EventFormat]

    def id_of(self, name: str) -> int | None:
        fmt = self.events.get(name)
        return fmt.id if fmt is not None else None


_FIELD_RE: Final = re.compile(
    r"field:(?P<decl>[^;]+);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);"
)


def parse_formats(text: str) -> Formats:
    """The ``format`` files (``name:``/``ID:``/``field:`` lines) and ``header_page``.

    :raises AnalysisError: no header_page, or an event without its ID
    """
    events: dict[str, EventFormat] = {}
    header: dict[str, Field] = {}
    name: str | None = None
    ident: int | None = None
    fields: dict[str, Field] = {}

    def close() -> None:
        if name is not None:
            if ident is None:
                raise AnalysisError(f"trace formats: event {name} has no ID")
            events[name] = EventFormat(name, ident, dict(fields))

    for line in text.splitlines():
        s = line.strip()
        if s.startswith("name:"):
            close()
            name, ident, fields = s[5:].strip(), None, {}
        elif s.startswith("ID:"):
            ident = int(s[3:])
        elif (m := _FIELD_RE.search(s)) is not None:
            field_name = m["decl"].split()[-1].split("[")[0]
            f = Field(int(m["off"]), int(m["size"]))
            (fields if name is not None else header)[field_name] = f
        elif s.startswith("=== header_page"):
            close()
            name = None
    close()
    if "commit" not in header or "data" not in header:
        raise AnalysisError("trace formats: no header_page (commit and data fields)")
    data = header["data"]
    return Formats(
        data.offset + data.size, header["commit"].offset, header["commit"].size, data.offset, events
    )


def read_capture(directory: Path) -> tuple[Formats, dict[int, Path]]:
    """The formats and the page files (by CPU) of a raw capture directory.

    :raises AnalysisError: not a raw capture
    """
    try:
        formats = parse_formats((directory / FORMATS).read_text())
    except OSError as err:
        raise AnalysisError(f"{directory} is not a raw trace capture: {err}") from err
    files = {
        int(p.name[3:].partition(".")[0]): p
        for pattern in ("cpu*.pages", "cpu*.pages.xz")
        for p in directory.glob(pattern)
    }
    return formats, dict(sorted(files.items()))


def read_pages(path: Path) -> bytes:
    """A ``cpuN.pages`` file (``.xz``: compressed, as kept in fixtures)."""
    try:
        return lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    except (OSError, lzma.LZMAError) as err:
        raise AnalysisError(f"cannot read trace pages {path}: {err}") from err


#: pages read from a capture file at a time (1 MiB of 4 KiB pages): a capture is decoded
#: as a stream, its memory bounded by this, never by the capture's size
CHUNK_PAGES = 256


def iter_pages(path: Path, page_size: int, pages: int = CHUNK_PAGES) -> Iterator[bytes]:
    """A ``cpuN.pages`` file (or ``.pages.xz``) in chunks of ``pages`` whole pages."""
    size = pages * page_size
    rest = b""
    try:
        with lzma.open(path, "rb") if path.suffix == ".xz" else path.open("rb") as f:
            while chunk := f.read(size):
                data = rest + chunk
                whole = len(data) - len(data) % page_size
                rest = data[whole:]
                if whole:
                    yield data[:whole]
    except (OSError, lzma.LZMAError, EOFError) as err:
        raise AnalysisError(f"cannot read trace pages {path}: {err}") from err


# -- decoding ------------------------------------------------------------------------
# The hot loop (every event of a capture) is written for mypyc, which compiles this
# module where the build has a C compiler (``make native``, docs/performance.md): plain
# functions and a class with i64 fields, bytes read by index, no struct calls and no
# closures.  The same code runs as plain Python where it is not compiled (in L1).


def _u32(data: bytes, at: i64) -> i64:
    return data[at] | data[at + 1] << 8 | data[at + 2] << 16 | data[at + 3] << 24


def _u64(data: bytes, at: i64) -> int:
    return int(_u32(data, at)) | int(_u32(data, at + 4)) << 32


class _Layout:
    """Where :func:`_decode_page` finds things: the page header's and each used
    event's id and field offsets, from the capture's formats (-1: not traced)."""

    def __init__(self, formats: Formats) -> None:
        ev = formats.events

        def eid(name: str) -> i64:
            fmt = ev.get(name)
            return fmt.id if fmt is not None else -1

        def off(name: str, fld: str) -> i64:
            fmt = ev.get(name)
            return fmt.fields[fld].offset if fmt is not None else 0

        self.page: i64 = formats.page_size
        self.data_off: i64 = formats.data_offset
        self.commit_off: i64 = formats.commit_offset
        self.np_id: i64 = eid("kvm_async_pf_not_present")
        self.ready_id: i64 = eid("kvm_async_pf_ready")
        for name in ("kvm_async_pf_not_present", "kvm_async_pf_ready"):
            if eid(name) >= 0 and off(name, "gva") != off(name, "token") + 8:
                # the layout of 6.1 and 6.12; another one is a new kernel's to decode
                raise AnalysisError(f"trace formats: {name}: gva does not follow token")
        self.np_token: i64 = off("kvm_async_pf_not_present", "token")
        self.ready_token: i64 = off("kvm_async_pf_ready", "token")
        self.completed_id: i64 = eid("kvm_async_pf_completed")
        self.completed_gva: i64 = off("kvm_async_pf_completed", "gva")
        self.repeated_id: i64 = eid("kvm_async_pf_repeated_fault")
        self.repeated_gva: i64 = off("kvm_async_pf_repeated_fault", "gva")
        self.try_id: i64 = eid("kvm_try_async_get_page")
        self.try_gva: i64 = off("kvm_try_async_get_page", "gva")
        self.msr_id: i64 = eid("kvm_msr")
        self.msr_write: i64 = off("kvm_msr", "write")
        self.msr_ecx: i64 = off("kvm_msr", "ecx")
        self.msr_data: i64 = off("kvm_msr", "data")
        self.msr_exception: i64 = off("kvm_msr", "exception")
        self.exc_id: i64 = eid("kvm_inj_exception")
        self.exc_vector: i64 = off("kvm_inj_exception", "exception")
        self.exc_reinjected: i64 = off("kvm_inj_exception", "reinjected")
        self.marker_id: i64 = eid(PRINT_EVENT)
        self.marker_buf: i64 = off(PRINT_EVENT, "buf")


class _Tally:
    """Ring-buffer data events seen, and those not used (other events, other MSRs)."""

    def __init__(self) -> None:
        self.events: i64 = 0
        self.unparsed: i64 = 0


_ACK_MSR_ID: Final = int(ACK_MSR, 16)
_PF_VECTOR: Final = 14


def _decode_page(
    data: bytes,
    base: i64,
    lay: _Layout,
    cpu: int,
    out: list[Event],
    keys: list[int] | None,
    tally: _Tally,
    markers: list[tuple[int, str]],
) -> None:
    """Append the used events of the page at ``base`` to ``out`` (and, when ``keys``
    is a list, their ns times to it, for merging CPUs); markers' texts to ``markers``."""
    ts: int = _u64(data, base)  # ns; its top bits may be set (_TS_MSB): not an i64
    end: i64 = base + lay.data_off + (_u64(data, base + lay.commit_off) & COMMIT_BYTES)
    end = min(end, base + lay.page)
    at: i64 = base + lay.data_off
    while at < end:
        h: i64 = _u32(data, at)
        type_len: i64 = h & 31
        if type_len > 28:
            if type_len == 29:  # padding: a discarded event, or the page's end
                if not h >> 5:
                    break
                at += 4 + _u32(data, at + 4)
            elif type_len == 30:  # time extend
                ts += _u32(data, at + 4) << _TS_SHIFT | h >> 5
                at += 8
            else:  # absolute time stamp (its top bits are the page's)
                ts = (_u32(data, at + 4) << _TS_SHIFT | h >> 5) | (ts & _TS_MSB)
                at += 8
            continue
        ts += h >> 5
        start: i64
        if type_len:
            start = at + 4
            at = start + 4 * type_len
        else:
            start = at + 8
            at = at + 4 + _u32(data, at + 4)
        if at > end or start + 8 > end:  # a length past the page: not an event
            break
        tally.events += 1
        ev = _decode_event(data, start, at, (ts + 500) // 1000, lay, cpu, markers)
        if ev is None:
            tally.unparsed += 1
            continue
        out.append(ev)
        if keys is not None:
            keys.append(ts)


def _decode_event(
    data: bytes,
    start: i64,
    end: i64,
    ts_us: int,
    lay: _Layout,
    cpu: int,
    markers: list[tuple[int, str]],
) -> Event | None:
    """The payload at ``start`` as an Event, None if not one the analysis uses.
    ``ts_us`` is its time as the kernel prints it (ns2usecs)."""
    tid: i64 = data[start] | data[start + 1] << 8
    pid: i64 = _u32(data, start + 4)
    pid -= pid >> 31 << 32  # common_pid is an int
    kind: Kind
    token: int = NO_TOKEN
    gva: int = 0
    if tid == lay.np_id:
        kind = _NP
        token, gva = _u64(data, start + lay.np_token), _u64(data, start + lay.np_token + 8)
    elif tid == lay.ready_id:
        kind = _READY
        token, gva = _u64(data, start + lay.ready_token), _u64(data, start + lay.ready_token + 8)
    elif tid == lay.exc_id:
        if data[start + lay.exc_vector] != _PF_VECTOR:  # as parse._exception: #PF only
            return None
        kind = _PF_RE if data[start + lay.exc_reinjected] else _PF
    elif tid == lay.msr_id:
        # as parse._msr: a write of the ACK MSR, odd, that did not fault
        if not (
            _u32(data, start + lay.msr_write)
            and _u32(data, start + lay.msr_ecx) == _ACK_MSR_ID
            and not data[start + lay.msr_exception]
            and data[start + lay.msr_data] & 1
        ):
            return None
        kind = _ACK
    elif tid == lay.completed_id:
        kind, gva = _COMPLETED, _u64(data, start + lay.completed_gva)
    elif tid == lay.try_id:
        kind, gva = _TRY, _u64(data, start + lay.try_gva)
    elif tid == lay.repeated_id:
        kind, gva = _REPEATED, _u64(data, start + lay.repeated_gva)
    elif tid == lay.marker_id:
        kind = _MARK
        if len(markers) < MAX_MARKERS:
            text = data[start + lay.marker_buf : end].partition(b"\0")[0]
            markers.append((ts_us, text.decode(errors="replace").strip()))
    else:
        return None
    return _new_event(Event, (ts_us, pid, cpu, kind, token, gva))


def page_events(data: bytes, formats: Formats) -> Iterator[tuple[int, int, int, int]]:
    """Every data event of a buffer of pages: (ts_ns, type id, payload start, payload end).

    Padding, time extends and time stamps are consumed here.
    """
    page, data_off, c_off = formats.page_size, formats.data_offset, formats.commit_offset
    u32 = _U32.unpack_from
    for base in range(0, len(data) - page + 1, page):
        ts = _U64.unpack_from(data, base)[0]
        end = min(
            base + page, base + data_off + (_U64.unpack_from(data, base + c_off)[0] & COMMIT_BYTES)
        )
        off = base + data_off
        while off < end:
            h = u32(data, off)[0]
            type_len = h & 31
            if type_len <= 28:
                ts += h >> 5
                if type_len:
                    start, off = off + 4, off + 4 + 4 * type_len
                else:
                    length = u32(data, off + 4)[0]
                    start, off = off + 8, off + 4 + length
                if off > end or start + 2 > end:  # a length past the page: not an event
                    break
                yield ts, data[start] | data[start + 1] << 8, start, off
            elif type_len == 29:  # padding: a discarded event, or the page's end
                if not h >> 5:
                    break
                off += 4 + u32(data, off + 4)[0]
            elif type_len == 30:  # time extend
                ts += u32(data, off + 4)[0] << _TS_SHIFT | h >> 5
                off += 8
            else:  # absolute time stamp (its top bits are the page's)
                ts = (u32(data, off + 4)[0] << _TS_SHIFT | h >> 5) | (ts & _TS_MSB)
                off += 8


def page_losses(data: bytes, formats: Formats) -> tuple[int, int]:
    """(pages flagged ``RB_MISSED_EVENTS``, the lost events their stored counts say):
    the reader lost events before each such page (its buffer was overwritten)."""
    page, data_off, c_off = formats.page_size, formats.data_offset, formats.commit_offset
    marks = counted = 0
    for base in range(0, len(data) - page + 1, page):
        commit = _U64.unpack_from(data, base + c_off)[0]
        if commit & MISSED_EVENTS:
            marks += 1
            at = base + data_off + (commit & COMMIT_BYTES)
            if commit & MISSED_STORED and at + 8 <= base + page:
                counted += _U64.unpack_from(data, at)[0]
    return marks, counted


def _cpu_events(
    chunks: Iterable[bytes], cpu: int, formats: Formats, stats: ParseStats, *, keyed: bool
) -> Generator[tuple[int, Event] | Event, None, None]:
    """One CPU's events in order, page by page (``keyed``: as ``(ts_ns, Event)``, for
    merging CPUs), from its pages in chunks of whole pages; markers' texts kept in
    ``stats``."""
    lay = _Layout(formats)
    tally = _Tally()
    page = formats.page_size
    out: list[Event] = []
    keys: list[int] | None = [] if keyed else None
    try:
        for data in chunks:
            marks, counted = page_losses(data, formats)
            stats.lost_marks += marks
            stats.lost_counted += counted
            for base in range(0, len(data) - page + 1, page):
                _decode_page(data, base, lay, cpu, out, keys, tally, stats.markers)
                if keys is not None:
                    yield from zip(keys, out, strict=True)
                    keys.clear()
                else:
                    yield from out
                out.clear()
    finally:
        stats.lines += tally.events
        stats.unparsed += tally.unparsed
        stats.events += tally.events - tally.unparsed


def iter_raw_events(
    directory: Path, stats: ParseStats | None = None
) -> Generator[Event, None, None]:
    """The :class:`Event` s of a raw capture, all CPUs merged in time order (as
    ``trace_pipe`` merges them); ``stats`` counts as :func:`parse.iter_events`
    does (a ring-buffer event for a line).

    The files are read as a stream (:data:`CHUNK_PAGES` at a time per CPU).

    :raises AnalysisError: not a raw capture, or a page file cannot be read
    """
    formats, files = read_capture(directory)
    chunks = {cpu: iter_pages(p, formats.page_size) for cpu, p in files.items()}
    yield from decode(formats, chunks, stats)


def decode(
    formats: Formats,
    pages: dict[int, bytes] | dict[int, Iterator[bytes]],
    stats: ParseStats | None = None,
) -> Generator[Event, None, None]:
    """The events of each CPU's pages (in memory, or chunks of whole pages), merged
    in time order."""
    stats = stats if stats is not None else ParseStats()
    chunks = {
        cpu: iter((data,)) if isinstance(data, bytes) else data for cpu, data in pages.items()
    }
    if len(chunks) == 1:
        ((cpu, one),) = chunks.items()
        yield from cast(Iterator[Event], _cpu_events(one, cpu, formats, stats, keyed=False))
        return
    streams = [
        cast(Iterator[tuple[int, Event]], _cpu_events(c, cpu, formats, stats, keyed=True))
        for cpu, c in chunks.items()
    ]
    for _, ev in heapq.merge(*streams, key=_first):
        yield ev


def _first(pair: tuple[int, Event]) -> int:
    return pair[0]


def compress_capture(directory: Path) -> int:
    """Each ``cpuN.pages`` of a finished capture to ``cpuN.pages.xz`` (the pages are
    mostly the zeros of partly filled pages: ~10x smaller); returns the bytes saved."""
    saved = 0
    for path in sorted(directory.glob("cpu*.pages")):
        data = path.read_bytes()
        packed = lzma.compress(data, preset=1)
        dest = path.with_name(path.name + ".xz")
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(packed)
        tmp.rename(dest)
        path.unlink()
        saved += len(data) - len(packed)
    return saved


def is_capture(path: Path) -> bool:
    return path.is_dir() and (path / FORMATS).is_file()


# -- counting, for the live stall watch ----------------------------------------------
@dataclass
class Counts:
    """What :func:`count` saw in some pages."""

    not_present: int = 0
    ready: int = 0
    #: the not_present / ready events after the last wake-all (None: no wake-all)
    after_wake_all: tuple[int, int] | None = None
    last_ts_us: int | None = None


def count(pages: Iterable[bytes], formats: Formats) -> Counts:
    """Count not_present and ready events, cheaply (no Event objects): the stall
    watch's every-second look at what the tracer read, beside the guest."""
    np_id = formats.id_of("kvm_async_pf_not_present")
    ready_id = formats.id_of("kvm_async_pf_ready")
    tok = formats.events["kvm_async_pf_ready"].fields["token"].offset if ready_id else 0
    u64 = _U64.unpack_from
    n_np = n_ready = 0
    wake: list[int] | None = None  # [not_present, ready] since the last wake-all
    last: int | None = None
    for data in pages:
        for ts, type_id, start, _ in page_events(data, formats):
            last = ts
            if type_id == np_id:
                n_np += 1
                if wake is not None:
                    wake[0] += 1
            elif type_id == ready_id:
                n_ready += 1
                if u64(data, start + tok)[0] == WAKE_ALL_TOKEN:
                    wake = [0, 0]
                elif wake is not None:
                    wake[1] += 1
    return Counts(
        n_np,
        n_ready,
        (wake[0], wake[1]) if wake is not None else None,
        (last + 500) // 1000 if last is not None else None,
    )
