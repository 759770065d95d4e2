"""Trace text → events: parse the tracefs lines of the kvm async-PF events.

Input is the text the kernel writes into ``trace`` or ``trace_pipe`` of a tracefs
instance (``#`` header lines allowed), e.g. (columns shortened)::

 qemu-system-x86-135 [000] ..... 22.435703: kvm_async_pf_not_present: token 0x1001 gva 0x177fd000
       CPU 0/KVM-134 [000] .N...  9.092988: kvm_async_pf_ready: token 0xffffffff gva 0x0
      kworker/0:1-17 [000] ..... 22.436089: kvm_async_pf_completed: gva 0x177fd000 address 0x7f7...

The task name (``comm``) may contain spaces and ``-`` (QEMU's ``debug-threads=on``
names vCPU threads ``CPU 0/KVM``): the pid is the digits after the *last* ``-``
before the ``[cpu]`` field.  The ``irqs-off/need-resched/...`` flags column and
a ``(tgid)`` column (``options/record-tgid``) are optional.

``trace_marker`` writes (``tracing_mark_write: ...``) become :attr:`Kind.MARKER`
events: they carry only a timestamp, so a runner that writes a marker when it
stops tracing gives the analysis the true end of observation.

Only the events the analysis needs become :class:`Event` s; every other line
(other events, other MSRs, exceptions other than #PF) is skipped and counted as
*unparsed* by :func:`iter_events`.  Lines of a known event whose arguments do not
parse are counted apart as *malformed* (a truncated last line of ``trace_pipe``,
or a kernel whose event format changed).

Speed: three ``str.partition`` calls per line, a cache of the ``comm-pid [cpu]
flags`` prefix, one small parser per event (looked up by name) and one
:class:`Event` tuple per event; a precompiled regular expression is only the
fallback for unusual layouts.  ``apflab bench`` measures it.
"""

from __future__ import annotations

import gzip
import io
import lzma
import re
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Final, NamedTuple, TextIO

from apflab.errors import AnalysisError

#: ``MSR_KVM_ASYNC_PF_ACK`` as ``kvm_msr`` prints it (``%x``).
ACK_MSR: Final = "4b564d07"
#: The token of a wake-all (broadcast) page-ready.
WAKE_ALL_TOKEN: Final = 0xFFFFFFFF
#: :attr:`Event.token` of events that carry no token.
NO_TOKEN: Final = -1


class Kind(IntEnum):
    """What an :class:`Event` is.  Values are small ints (cheap to compare)."""

    NOT_PRESENT = 0  #: ``kvm_async_pf_not_present`` (vCPU thread): token, gva
    READY = 1  #: ``kvm_async_pf_ready`` (vCPU thread): token, gva
    COMPLETED = 2  #: ``kvm_async_pf_completed`` (kworker): gva (no token)
    REPEATED_FAULT = 3  #: ``kvm_async_pf_repeated_fault``: gva
    TRY_GET_PAGE = 4  #: ``kvm_try_async_get_page``: gva
    ACK = 5  #: ``kvm_msr: msr_write 4b564d07 = <odd>``: the guest's page-ready ACK
    PF = 6  #: ``kvm_inj_exception: #PF ...`` (first injection)
    PF_REINJECTED = 7  #: ``kvm_inj_exception: #PF ... [reinjected]``
    MARKER = 8  #: ``tracing_mark_write`` (a ``trace_marker`` write): a timestamp only


class Event(NamedTuple):
    """One trace event.

    :ivar ts_us: timestamp in integer microseconds (the trace clock's value)
    :ivar pid: the emitting thread's id (a vCPU thread, or a kworker for COMPLETED)
    :ivar cpu: the host (L1) CPU the event was logged on
    :ivar kind: a :class:`Kind`
    :ivar token: the async-PF token, or :data:`NO_TOKEN`
    :ivar gva: the faulting address as KVM logs it (with TDP it is the guest
        *physical* address of the fault, offset included), or 0
    """

    ts_us: int
    pid: int
    cpu: int
    kind: Kind
    token: int
    gva: int


@dataclass
class ParseStats:
    """Counters :func:`iter_events` fills in while it reads (one per reader).

    :ivar lines: every line seen
    :ivar header: ``#`` comment lines, blank lines and ``[LOST]`` lines
    :ivar events: lines that became an :class:`Event`
    :ivar unparsed: other lines (other events, other MSRs, non-#PF exceptions,
        text that is not a trace line); includes ``malformed``
    :ivar malformed: lines of a handled event whose arguments did not parse
    :ivar first_malformed: the first such line, for error messages
    :ivar markers: ``(ts_us, text)`` of each ``trace_marker`` line (the first
        :data:`MAX_MARKERS`): what the runner noted on the trace clock
    :ivar lost_marks: places where the trace itself says events were lost before
        it (``CPU:N [LOST n EVENTS]`` lines; a raw page flagged ``RB_MISSED_EVENTS``)
    :ivar lost_counted: the events those places say were lost, where they say how many
    """

    lines: int = 0
    header: int = 0
    events: int = 0
    unparsed: int = 0
    malformed: int = 0
    first_malformed: str | None = None
    markers: list[tuple[int, str]] = field(default_factory=list)
    lost_marks: int = 0
    lost_counted: int = 0

    def lost_at_least(self) -> int:
        """The events the trace itself says were lost (each mark is at least one)."""
        return max(self.lost_counted, self.lost_marks)

    def marker(self, text: str) -> int | None:
        """The time of the first marker with this text, None if there is none."""
        return next((ts for ts, t in self.markers if t == text), None)


#: trace_marker lines kept in :attr:`ParseStats.markers`
MAX_MARKERS: Final = 10_000


_MARKER_SEP: Final = ": tracing_mark_write: "
_NP: Final = Kind.NOT_PRESENT
_READY: Final = Kind.READY
_COMPLETED: Final = Kind.COMPLETED
_ACK: Final = Kind.ACK
_PF: Final = Kind.PF
_PF_RE: Final = Kind.PF_REINJECTED
_MARK: Final = Kind.MARKER
_new_event: Final = tuple.__new__  # Event(...) without the generated __new__'s Python frame
_PREFIX_CACHE_MAX: Final = 4096

# The general layout, for lines the fast path does not take (a tgid column, odd spacing).
_LINE_RE: Final = re.compile(
    r"^\s*(?P<comm>.*)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:[^\s\d]\S*\s+)?(?P<ts>\d+(?:\.\d+)?): (?P<event>\w+): (?P<args>.*)$"
)
_PREFIX_RE: Final = re.compile(
    r"^\s*(?P<comm>.*)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\](?:\s+[^\s\d]\S*)?$"
)


def _ts_us(ts: str) -> int:
    sec, _, frac = ts.partition(".")
    if len(frac) == 6:
        return int(sec + frac)
    if not frac:
        return int(sec) * 1_000_000
    return int(sec) * 1_000_000 + int((frac + "000000")[:6])


def _prefix(prefix: str) -> tuple[int, int] | None:
    """``"  comm-pid   [cpu] flags"`` (flags and a ``(tgid)`` optional) → (pid, cpu)."""
    parts = prefix.rsplit(None, 2)
    if len(parts) == 3 and parts[1][:1] == "[" and parts[1][-1:] == "]":
        task, cpu = parts[0], parts[1]
    elif len(parts) >= 2 and parts[-1][:1] == "[" and parts[-1][-1:] == "]":
        task, cpu = prefix.rsplit(None, 1)
    else:
        task = cpu = ""
    pid = task.rpartition("-")[2]
    if pid.isdigit() and cpu[1:-1].isdigit() and "(" not in task:
        return int(pid), int(cpu[1:-1])
    m = _PREFIX_RE.match(prefix)
    return (int(m["pid"]), int(m["cpu"])) if m else None


# -- the arguments of each event we keep ------------------------------------------------
# Each takes the time, pid and CPU of the line and the text after "kvm_<event>: ", and
# returns the Event, or None when the line is not one the analysis uses (another MSR,
# another exception).  Malformed arguments raise ValueError or IndexError.
_ArgsParser = Callable[[int, int, int, str], Event | None]


def _token_and_gva(kind: Kind) -> _ArgsParser:
    def parse(ts_us: int, pid: int, cpu: int, args: str) -> Event:
        # "token 0x1001 gva 0x177fd000"
        a = args.split()
        if a[0] != "token" or a[2] != "gva":
            raise ValueError(args)
        return _new_event(Event, (ts_us, pid, cpu, kind, int(a[1], 16), int(a[3], 16)))

    return parse


def _completed(ts_us: int, pid: int, cpu: int, args: str) -> Event:
    # "gva 0x177fd000 address 0x7f70635fd000"
    if args[:4] != "gva ":
        raise ValueError(args)
    gva = int(args[4:].partition(" ")[0], 16)
    return _new_event(Event, (ts_us, pid, cpu, _COMPLETED, NO_TOKEN, gva))


def _gva_and_gfn(kind: Kind) -> _ArgsParser:
    def parse(ts_us: int, pid: int, cpu: int, args: str) -> Event:
        # "gva = 0x177fd000, gfn = 0x177fd"
        if args[:6] != "gva = ":
            raise ValueError(args)
        gva = int(args[6:].partition(",")[0], 16)
        return _new_event(Event, (ts_us, pid, cpu, kind, NO_TOKEN, gva))

    return parse


def _msr(ts_us: int, pid: int, cpu: int, args: str) -> Event | None:
    # "msr_write 4b564d07 = 0x1" (+ " (#GP)" when the write faulted: not an ACK)
    if not args.startswith("msr_write 4b564d07 "):
        return None
    a = args.split()
    if len(a) == 4 and int(a[3], 16) & 1:
        return _new_event(Event, (ts_us, pid, cpu, _ACK, NO_TOKEN, 0))
    return None


def _exception(ts_us: int, pid: int, cpu: int, args: str) -> Event | None:
    # "#PF (0x0)" or "#PF (0x0) [reinjected]"
    if args[:3] != "#PF":
        return None
    kind = _PF_RE if "[reinjected]" in args else _PF
    return _new_event(Event, (ts_us, pid, cpu, kind, NO_TOKEN, 0))


#: event name after "kvm_" → the parser of its arguments
_ARGS: dict[str, _ArgsParser] = {
    "async_pf_not_present": _token_and_gva(_NP),
    "async_pf_ready": _token_and_gva(_READY),
    "async_pf_completed": _completed,
    "async_pf_repeated_fault": _gva_and_gfn(Kind.REPEATED_FAULT),
    "try_async_get_page": _gva_and_gfn(Kind.TRY_GET_PAGE),
    "msr": _msr,
    "inj_exception": _exception,
}


def _parse_slow(line: str) -> Event | None:
    m = _LINE_RE.match(line.rstrip("\n"))
    if m is None or not m["event"].startswith("kvm_"):
        return None
    parse_args = _ARGS.get(m["event"][4:])
    if parse_args is None:
        return None
    return parse_args(_ts_us(m["ts"]), int(m["pid"]), int(m["cpu"]), m["args"])


def _parse_fallback(line: str) -> Event | None:
    """:func:`_parse_slow`, None for a line it cannot parse either."""
    try:
        return _parse_slow(line)
    except (IndexError, ValueError):
        return None


def _parse_marker(line: str) -> Event | None:
    head, sep, _ = line.partition(_MARKER_SEP)
    if not sep:
        return None
    prefix, _, ts = head.rpartition(" ")
    pc = _prefix(prefix)
    if pc is None:
        return None
    try:
        return _new_event(Event, (_ts_us(ts), pc[0], pc[1], _MARK, NO_TOKEN, 0))
    except ValueError:
        return None


def _keep_marker(line: str, stats: ParseStats) -> Event | None:
    """A ``trace_marker`` line's event, its text kept in ``stats.markers``."""
    marker = _parse_marker(line)
    if marker is not None and len(stats.markers) < MAX_MARKERS:
        stats.markers.append((marker.ts_us, line.partition(_MARKER_SEP)[2].strip()))
    return marker


#: what trace_pipe prints where the reader lost events (trace.c, print_trace_line)
_LOST_RE: Final = re.compile(r"CPU:\d+ \[LOST (?:(\d+) )?EVENTS\]")


def _lost_mark(line: str, stats: ParseStats) -> bool:
    """A ``CPU:N [LOST n EVENTS]`` line, counted in ``stats``."""
    m = _LOST_RE.match(line.lstrip())
    if m is None:
        return False
    stats.lost_marks += 1
    stats.lost_counted += int(m[1] or 0)
    return True


def _is_header(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def parse_line(line: str) -> Event | None:
    """Parse one trace line.

    :returns: the :class:`Event`, or None for header lines, events the analysis
        does not use, MSRs other than the ACK, exceptions other than #PF
    :raises ValueError: the line is a handled event whose arguments do not parse
        (:func:`iter_events` counts these as malformed instead)
    """
    head, sep, tail = line.partition(": kvm_")
    if not sep:
        return _parse_marker(line)
    name, sep2, args = tail.partition(": ")
    parse_args = _ARGS.get(name)
    if parse_args is None or not sep2:
        return None
    prefix, _, ts = head.rpartition(" ")
    pc = _prefix(prefix)
    try:
        if pc is None:
            raise ValueError(line)
        return parse_args(_ts_us(ts), pc[0], pc[1], args)
    except (IndexError, ValueError):
        slow = _parse_fallback(line)
        if slow is None:
            raise ValueError(f"malformed kvm_{name} line: {line.rstrip()!r}") from None
        return slow


def _remember_prefix(
    cache: dict[str, tuple[int, int] | None], prefix: str
) -> tuple[int, int] | None:
    if len(cache) >= _PREFIX_CACHE_MAX:
        cache.clear()
    pc = cache[prefix] = _prefix(prefix)
    return pc


def iter_events(
    lines: Iterable[str], stats: ParseStats | None = None
) -> Generator[Event, None, None]:
    """Yield the :class:`Event` of every line that is one, in input order.

    Lines that are not events are skipped.  Pass a :class:`ParseStats` to learn
    how many lines were headers, unparsed or malformed.

    :param lines: trace text lines (a file from :func:`open_trace`, a list, ...)
    :param stats: counters to fill in; optional
    """
    stats = stats if stats is not None else ParseStats()
    # The hot loop: parse_line's steps, plus a cache of the "comm-pid [cpu] flags"
    # prefix → (pid, cpu) (a handful of distinct threads write a trace: this halves
    # the per-line cost).  Counters live in locals, flushed once (also on early stop).
    parsers = _ARGS
    cache: dict[str, tuple[int, int] | None] = {}
    n = header = unparsed = malformed = 0
    try:
        for line in lines:
            n += 1
            head, sep, tail = line.partition(": kvm_")
            if not sep:
                if _is_header(line) or _lost_mark(line, stats):
                    header += 1
                elif (marker := _keep_marker(line, stats)) is not None:
                    yield marker
                else:
                    unparsed += 1
                continue
            name, sep2, args = tail.partition(": ")
            parse_args = parsers.get(name)
            if parse_args is None or not sep2:
                unparsed += 1
                continue
            prefix, _, ts = head.rpartition(" ")
            pc = cache.get(prefix) or _remember_prefix(cache, prefix)
            try:
                if pc is None:
                    raise ValueError(line)
                t = int(ts.replace(".", "")) if ts[-7:-6] == "." else _ts_us(ts)
                ev = parse_args(t, pc[0], pc[1], args)
            except (IndexError, ValueError):
                ev = _parse_fallback(line)
                if ev is None:
                    malformed += 1
                    if stats.first_malformed is None:
                        stats.first_malformed = line.rstrip("\n")
                    continue
            if ev is None:
                unparsed += 1
                continue
            yield ev
    finally:
        stats.lines += n
        stats.header += header
        stats.malformed += malformed
        stats.unparsed += unparsed + malformed
        stats.events += n - header - unparsed - malformed


def open_trace(path: str | Path) -> TextIO:
    """Open a trace for reading as text: plain, ``.xz`` or ``.gz`` (by suffix).

    Undecodable bytes are replaced (a trace cut mid-character stays readable).

    :raises AnalysisError: the file cannot be opened
    """
    p = Path(path)
    try:
        if p.suffix == ".xz":
            return io.TextIOWrapper(lzma.open(p, "rb"), encoding="utf-8", errors="replace")
        if p.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", errors="replace")
        return p.open(encoding="utf-8", errors="replace")
    except (OSError, lzma.LZMAError) as err:
        raise AnalysisError(f"cannot open trace {p}: {err}") from err
