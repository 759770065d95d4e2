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
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
FORMATS = "formats.txt"
#: the pages of CPU N
PAGES = "cpu{}.pages"
#: the ftrace event that ``trace_marker`` writes
PRINT_EVENT = "print"
#: a page's commit: its bytes of events are the bits below the flags ``RB_MISSED_STORED``
#: (bit 30: the count of lost events follows the events) and ``RB_MISSED_EVENTS`` (bit 31:
#: events were lost before this page).  The kernel adds the flags to a 64-bit ``local_t``
#: as ints, so bit 31 comes sign-extended: every bit from 31 up is set (seen in the lab)
COMMIT_BYTES = (1 << 30) - 1
MISSED_STORED = 1 << 30
MISSED_EVENTS = 1 << 31
_TS_SHIFT = 27
_TS_MSB = 0x1F << 59
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_new_event = tuple.__new__


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


_FIELD_RE = re.compile(r"field:(?P<decl>[^;]+);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);")


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


# -- decoding ------------------------------------------------------------------------
#: one event's payload (pid, data, offset, its end) → an Event or None (not one we use);
#: markers are handled apart (their text goes into ParseStats)
_Decoder = Callable[[int, int, bytes, int, int], Event | None]


def _decoders(formats: Formats) -> dict[int, _Decoder]:
    """Event id → the decoder of its payload, for the events the analysis uses."""
    out: dict[int, _Decoder] = {}

    def field(event: str, name: str) -> int:
        return formats.events[event].fields[name].offset

    def token_and_gva(event: str, kind: Kind) -> None:
        t, g = field(event, "token"), field(event, "gva")
        if g != t + 8:  # one unpack for both: the layout of 6.1 and 6.12
            raise AnalysisError(f"trace formats: {event}: gva does not follow token")
        unpack = struct.Struct("<QQ").unpack_from

        def dec(ts: int, pid: int, data: bytes, off: int, cpu: int) -> Event:
            token, gva = unpack(data, off + t)
            return _new_event(Event, (ts, pid, cpu, kind, token, gva))

        out[formats.events[event].id] = dec

    def gva_only(event: str, kind: Kind) -> None:
        g = field(event, "gva")
        unpack = _U64.unpack_from

        def dec(ts: int, pid: int, data: bytes, off: int, cpu: int) -> Event:
            return _new_event(Event, (ts, pid, cpu, kind, NO_TOKEN, unpack(data, off + g)[0]))

        out[formats.events[event].id] = dec

    ev = formats.events
    if "kvm_async_pf_not_present" in ev:
        token_and_gva("kvm_async_pf_not_present", Kind.NOT_PRESENT)
    if "kvm_async_pf_ready" in ev:
        token_and_gva("kvm_async_pf_ready", Kind.READY)
    for name, kind in (
        ("kvm_async_pf_completed", Kind.COMPLETED),
        ("kvm_async_pf_repeated_fault", Kind.REPEATED_FAULT),
        ("kvm_try_async_get_page", Kind.TRY_GET_PAGE),
    ):
        if name in ev:
            gva_only(name, kind)
    if "kvm_msr" in ev:
        out[ev["kvm_msr"].id] = _msr_decoder(formats)
    if "kvm_inj_exception" in ev:
        out[ev["kvm_inj_exception"].id] = _exception_decoder(formats)
    return out


def _msr_decoder(formats: Formats) -> _Decoder:
    f = formats.events["kvm_msr"].fields
    w, e, d, x = f["write"].offset, f["ecx"].offset, f["data"].offset, f["exception"].offset
    ack = int(ACK_MSR, 16)
    u32, u64 = _U32.unpack_from, _U64.unpack_from

    def dec(ts: int, pid: int, data: bytes, off: int, cpu: int) -> Event | None:
        # as parse._msr: a write of the ACK MSR, odd, that did not fault
        if (
            u32(data, off + w)[0]
            and u32(data, off + e)[0] == ack
            and not data[off + x]
            and u64(data, off + d)[0] & 1
        ):
            return _new_event(Event, (ts, pid, cpu, Kind.ACK, NO_TOKEN, 0))
        return None

    return dec


def _exception_decoder(formats: Formats) -> _Decoder:
    f = formats.events["kvm_inj_exception"].fields
    vec, re_off = f["exception"].offset, f["reinjected"].offset

    def dec(ts: int, pid: int, data: bytes, off: int, cpu: int) -> Event | None:
        if data[off + vec] != 14:  # as parse._exception: #PF only
            return None
        kind = Kind.PF_REINJECTED if data[off + re_off] else Kind.PF
        return _new_event(Event, (ts, pid, cpu, kind, NO_TOKEN, 0))

    return dec


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
    data: bytes, cpu: int, formats: Formats, stats: ParseStats
) -> Generator[tuple[int, Event], None, None]:
    """(ts_ns, Event) of one CPU's pages, in order; markers' texts kept in ``stats``."""
    decoders = _decoders(formats)
    marker_id = formats.id_of(PRINT_EVENT)
    buf_off = formats.events[PRINT_EVENT].fields["buf"].offset if marker_id is not None else 0
    pid_at = struct.Struct("<i").unpack_from
    marks, counted = page_losses(data, formats)
    stats.lost_marks += marks
    stats.lost_counted += counted
    n = unparsed = 0
    try:
        for ts_ns, type_id, start, end in page_events(data, formats):
            n += 1
            ts_us = (ts_ns + 500) // 1000  # as the kernel prints it (ns2usecs)
            dec = decoders.get(type_id)
            if dec is not None:
                ev = dec(ts_us, pid_at(data, start + 4)[0], data, start, cpu)
                if ev is None:
                    unparsed += 1
                    continue
                yield ts_ns, ev
            elif type_id == marker_id:
                pid = pid_at(data, start + 4)[0]
                text = data[start + buf_off : end].partition(b"\0")[0]
                if len(stats.markers) < MAX_MARKERS:
                    stats.markers.append((ts_us, text.decode(errors="replace").strip()))
                yield ts_ns, _new_event(Event, (ts_us, pid, cpu, Kind.MARKER, NO_TOKEN, 0))
            else:
                unparsed += 1
    finally:
        stats.lines += n
        stats.unparsed += unparsed
        stats.events += n - unparsed


def iter_raw_events(
    directory: Path, stats: ParseStats | None = None
) -> Generator[Event, None, None]:
    """The :class:`Event` s of a raw capture, all CPUs merged in time order (as
    ``trace_pipe`` merges them); ``stats`` counts as :func:`parse.iter_events`
    does (a ring-buffer event for a line).

    :raises AnalysisError: not a raw capture
    """
    formats, files = read_capture(directory)
    yield from decode(formats, {cpu: read_pages(p) for cpu, p in files.items()}, stats)


def decode(
    formats: Formats, pages: dict[int, bytes], stats: ParseStats | None = None
) -> Generator[Event, None, None]:
    """The events of each CPU's pages (in memory), merged in time order."""
    stats = stats if stats is not None else ParseStats()
    streams = [_cpu_events(data, cpu, formats, stats) for cpu, data in pages.items()]
    if len(streams) == 1:
        for _, ev in streams[0]:
            yield ev
        return
    for _, ev in heapq.merge(*streams, key=lambda pair: pair[0]):
        yield ev


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
