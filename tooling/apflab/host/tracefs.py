"""Capture KVM async-PF trace events through a tracefs instance of our own.

The instance (``instances/apflab-<run>``) has its own buffers, clock and
event selection, so we never disturb the host's global tracer.  Events are
streamed while the run goes on, so long runs do not overflow the ring buffer:
as the ring buffer's own pages from each CPU's ``trace_pipe_raw`` into a
capture directory (``raw``: the kernel formats nothing; decoded on the outer
host by :mod:`apflab.analysis.ringbuf`), or as text from ``trace_pipe`` (the
kernel formats every event, in the reader's CPU time).  Overrun and dropped
counts from ``per_cpu/cpu*/stats`` are read at the end and any loss is reported.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, ClassVar

from apflab.errors import HostError, PreflightError
from apflab.process import run
from apflab.undo import Action, UndoStack

log = logging.getLogger(__name__)

MSR_KVM_ASYNC_PF_ACK = 0x4B564D07
#: how often the raw reader looks: each look copies the pages written since, a page
#: not yet full event by event (the kernel's partial-page path), so rarer looks mean
#: fewer, fuller pages (the 8 MiB default buffer holds minutes of a default run;
#: the stall watch polls once a second)
RAW_POLL_S = 0.25
#: the formats file of a raw capture (apflab.analysis.ringbuf.FORMATS)
RAW_FORMATS = "formats.txt"

#: event -> filter (None: unfiltered). kvm_inj_exception(#PF) tells interrupt-path
#: async PFs (the guest got a #PF with the token) from APF-halt ones.
DEFAULT_EVENTS: dict[str, str | None] = {
    "kvm_async_pf_not_present": None,
    "kvm_async_pf_ready": None,
    "kvm_async_pf_completed": None,
    "kvm_async_pf_repeated_fault": None,
    "kvm_try_async_get_page": None,
    "kvm_msr": f"ecx == {MSR_KVM_ASYNC_PF_ACK:#x}",
    "kvm_inj_exception": "exception == 14",
}

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


def parse_cpu_stats(text: str) -> dict[str, int]:
    """Parse ``per_cpu/cpuN/stats`` (``name: value`` lines; timestamps skipped)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            try:
                out[name.strip().replace(" ", "_")] = int(value.strip())
            except ValueError:
                continue
    return out


@dataclass
class Unmount(Action):
    kind: ClassVar[str] = "unmount"
    path: str

    def undo(self) -> None:
        if os.path.ismount(self.path):
            run(["umount", self.path])


@dataclass
class RemoveTracefsInstance(Action):
    """Disable tracing in our instance and remove it."""

    kind: ClassVar[str] = "remove-tracefs-instance"
    path: str

    def undo(self) -> None:
        p = Path(self.path)
        if not p.is_dir():
            return
        with contextlib.suppress(OSError):
            (p / "tracing_on").write_text("0")
        deadline = time.monotonic() + 10
        while True:
            try:
                p.rmdir()
                return
            except OSError as err:
                # EBUSY while a reader still has trace_pipe open
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise HostError(f"cannot remove tracefs instance {p}: {err.strerror}") from err
                time.sleep(0.1)


def find_tracefs(undo: UndoStack) -> Path:
    """Return the tracefs mount, mounting it (and registering the unmount) if needed."""
    for cand in TRACEFS_CANDIDATES:
        if (cand / "instances").is_dir():
            return cand
    target = TRACEFS_CANDIDATES[0]
    if not target.is_dir():
        raise PreflightError(f"{target} does not exist: this kernel has no tracefs")
    result = run(["mount", "-t", "tracefs", "nodev", str(target)], check=False)
    if not result.ok:
        raise PreflightError(f"cannot mount tracefs on {target}: {result.stderr.strip()}")
    undo.push(Unmount(str(target)))
    return target


@dataclass
class CaptureStats:
    """What the capture saw and lost."""

    bytes_written: int = 0
    #: CPU seconds the reader thread used (user + system: reading ``trace_pipe``
    #: includes the kernel's formatting of every event as text)
    reader_cpu_s: float = 0.0
    per_cpu: dict[int, dict[str, int]] = field(default_factory=dict)
    #: the raw ``per_cpu/cpuN/stats`` texts (kept with the run as evidence)
    raw: dict[int, str] = field(default_factory=dict)

    @property
    def overrun(self) -> int:
        return sum(s.get("overrun", 0) for s in self.per_cpu.values())

    @property
    def dropped(self) -> int:
        return sum(s.get("dropped_events", 0) for s in self.per_cpu.values())

    @property
    def lost(self) -> int:
        return self.overrun + self.dropped


def _read_pages(fd: int, page: int, most: int = 256) -> bytes:
    """What a non-blocking ``trace_pipe_raw`` has now, one page per read()."""
    chunks: list[bytes] = []
    while len(chunks) < most:
        try:
            chunk = os.read(fd, page)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(out: BinaryIO, data: bytes) -> None:
    """All of ``data`` to an unbuffered file (a write may take part of it)."""
    view = memoryview(data)
    while view:
        n = out.write(view)
        if not n:
            raise OSError(errno.ENOSPC, "no byte of the trace could be written")
        view = view[n:]


class _Fd:
    """An OS file descriptor, closed by :func:`contextlib.closing`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


class TraceSession:
    """A tracefs instance streaming the async-PF events to ``out_path``.

    :param buffer_kb: per-CPU ring buffer size (8 MiB/cpu held 17k APFs with
        no overrun in the lab, and the reader drains it continuously)
    :param stream: read while tracing (the default); False leaves the events in
        the ring buffer until :meth:`stop` drains it, so what tracing costs without
        its reader can be measured (events past a full buffer are lost, and counted)
    :param raw: ``out_path`` is a directory that gets the ring-buffer pages of each
        CPU (``cpuN.pages``) and ``formats.txt`` (:mod:`apflab.analysis.ringbuf`);
        else ``out_path`` is a file that gets ``trace_pipe``'s text.  A raw
        session that does not stream also keeps the text of ``trace`` (read
        before the pages are drained: the same events both ways) in ``text_twin``
    :param on_pages: called from the reader thread with each CPU's new pages (raw)
    """

    def __init__(
        self,
        name: str,
        out_path: Path,
        undo: UndoStack,
        buffer_kb: int = 8192,
        events: dict[str, str | None] | None = None,
        *,
        stream: bool = True,
        raw: bool = False,
        on_pages: Callable[[int, bytes], None] | None = None,
        text_twin: Path | None = None,
    ) -> None:
        self.name = name
        self.stream = stream
        self.raw = raw
        self.on_pages = on_pages
        self.text_twin = text_twin
        self.out_path = out_path
        self.undo = undo
        self.buffer_kb = buffer_kb
        self.events = dict(DEFAULT_EVENTS if events is None else events)
        self.instance: Path | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._bytes = 0
        self._reader_cpu = 0.0
        self._error: BaseException | None = None
        self.started_at = 0.0

    def start(self) -> None:
        root = find_tracefs(self.undo)
        kvm_events = root / "events" / "kvm"
        missing = [e for e in self.events if not (kvm_events / e).is_dir()]
        if missing:
            raise PreflightError(
                f"tracefs has no kvm events {missing}: load the kvm module (modprobe kvm) first"
            )
        inst = root / "instances" / self.name
        try:
            inst.mkdir()
        except OSError as err:
            raise HostError(f"cannot create tracefs instance {inst}: {err.strerror}") from err
        self.undo.push(RemoveTracefsInstance(str(inst)))
        self.instance = inst
        self._write("tracing_on", "0")
        self._write("trace_clock", "global")
        self._write("buffer_size_kb", str(self.buffer_kb))
        for event, flt in self.events.items():
            edir = f"events/kvm/{event}"
            if flt:
                self._write(f"{edir}/filter", flt)
            self._write(f"{edir}/enable", "1")
        self._write("trace", "")  # clear
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        if self.raw:
            self.out_path.mkdir(exist_ok=True)
            (self.out_path / RAW_FORMATS).write_text(self.formats())
        self.undo.callback(self._join_reader, f"stop trace reader {self.name}")
        if self.stream:
            self._start_reader()
        elif not self.raw:
            self.out_path.touch()
        self._write("tracing_on", "1")
        self.mark("apflab: trace start")
        self.started_at = time.monotonic()
        how = "streaming to" if self.stream else "recording, to be read after it stops into"
        log.info("trace: instance %s %s %s", inst, how, self.out_path)

    def _start_reader(self) -> None:
        assert self.instance is not None
        if self.raw:
            fds = self._open_raw()
            target: Callable[..., None] = self._pump_raw
            args: tuple[object, ...] = (fds,)
        else:
            fd = os.open(self.instance / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
            target, args = self._pump, (fd,)
        self._thread = threading.Thread(
            target=target, args=args, name=f"trace-{self.name}", daemon=True
        )
        self._thread.start()

    def _open_raw(self) -> dict[int, int]:
        """Each CPU's ``trace_pipe_raw``, non-blocking; a CPU that has no buffer (a
        possible CPU not online) is left out."""
        assert self.instance is not None
        fds: dict[int, int] = {}
        for d in sorted(self.instance.glob("per_cpu/cpu*"), key=lambda d: int(d.name[3:])):
            try:
                fds[int(d.name[3:])] = os.open(d / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno not in (errno.ENODEV, errno.ENOENT):
                    for fd in fds.values():
                        os.close(fd)
                    raise HostError(f"cannot open {d / 'trace_pipe_raw'}: {err.strerror}") from err
                log.debug("trace: %s has no ring buffer (%s)", d.name, err.strerror)
        return fds

    def mark(self, text: str) -> None:
        """Write a line into our instance's trace (``tracing_mark_write``)."""
        self._write("trace_marker", text)

    def formats(self) -> str:
        """The ``format`` files of our events and of ``ftrace/print`` (the
        ``trace_marker`` lines), then ``header_page``: what decodes a raw capture,
        and provenance for a text one."""
        assert self.instance is not None
        events = self.instance.parent.parent / "events"
        parts = [
            f"=== kvm/{e} ===\n{(events / 'kvm' / e / 'format').read_text()}" for e in self.events
        ]
        parts.append(
            f"=== ftrace/print ===\n{(events / 'ftrace' / 'print' / 'format').read_text()}"
        )
        parts.append(f"=== header_page ===\n{(events / 'header_page').read_text()}")
        return "\n".join(parts)

    def _write(self, rel: str, value: str) -> None:
        assert self.instance is not None
        try:
            (self.instance / rel).write_text(value)
        except OSError as err:
            raise HostError(
                f"cannot write {value!r} to {self.instance / rel}: {err.strerror}"
            ) from err

    def _pump(self, fd: int) -> None:
        """``trace_pipe``'s text to ``out_path``."""
        with self._reader(), contextlib.closing(_Fd(fd)), self.out_path.open("wb") as out:

            def step() -> int:
                try:
                    chunk = os.read(fd, 1 << 20)
                except BlockingIOError:
                    return 0
                out.write(chunk)
                return len(chunk)

            self._until_drained(step, 0.05)

    def _pump_raw(self, fds: dict[int, int]) -> None:
        """Each CPU's ``trace_pipe_raw`` to its ``cpuN.pages``: one page per read()
        (a page not yet full comes back with what it holds; nothing is formatted)."""
        page = os.sysconf("SC_PAGE_SIZE")
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._reader())
            for fd in fds.values():
                stack.enter_context(contextlib.closing(_Fd(fd)))
            # unbuffered: what the stall watch reads back to confirm a stall is all there
            outs = {
                c: stack.enter_context((self.out_path / f"cpu{c}.pages").open("ab", buffering=0))
                for c in fds
            }

            def step() -> int:
                got = 0
                for cpu, fd in fds.items():
                    data = _read_pages(fd, page)
                    if data:
                        _write_all(outs[cpu], data)
                        got += len(data)
                        if self.on_pages is not None:
                            self.on_pages(cpu, data)
                return got

            self._until_drained(step, RAW_POLL_S)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[None]:
        """The reader thread's body: its error kept for :meth:`check`, its CPU counted."""
        try:
            yield
        except BaseException as err:  # surfaced by stop()
            self._error = err
        finally:
            usage = resource.getrusage(resource.RUSAGE_THREAD)
            self._reader_cpu = usage.ru_utime + usage.ru_stime

    def _until_drained(self, step: Callable[[], int], pause_s: float) -> None:
        """Call ``step`` (bytes read) every ``pause_s`` while tracing; after stop, until
        three empty reads in a row (drained)."""
        idle_after_stop = 0
        while True:
            got = step()
            self._bytes += got
            if got:
                idle_after_stop = 0
                continue
            if self._stop.is_set():
                idle_after_stop += 1
                if idle_after_stop >= 3:
                    break
            time.sleep(0.05 if self._stop.is_set() else pause_s)

    def _join_reader(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def check(self) -> None:
        """Raise at once if the reader has failed (the disk under the trace filled up):
        a run whose trace is no longer kept has nothing more to learn.

        :raises HostError: the reader's error
        """
        if self._error is not None:
            raise HostError(f"trace reader failed: {self._error}") from self._error

    @property
    def bytes_written(self) -> int:
        return self._bytes

    def stop(self) -> CaptureStats:
        """Stop tracing, drain what is buffered to the file, read the loss counters."""
        assert self.instance is not None
        # The end of observation, on the trace clock: outstanding tokens are
        # censored at this time (their age is measured up to here).
        self.mark("apflab: trace end")
        self._write("tracing_on", "0")
        if not self.stream:  # drain the whole ring buffer now
            if self.raw and self.text_twin is not None:  # the same events, as text
                self.text_twin.write_bytes((self.instance / "trace").read_bytes())
            self._stop.set()
            self._start_reader()
        self._join_reader()
        self.check()
        stats = CaptureStats(self._bytes, round(self._reader_cpu, 2))
        for cpu_dir in sorted((self.instance / "per_cpu").glob("cpu*")):
            cpu = int(cpu_dir.name[3:])
            stats.raw[cpu] = (cpu_dir / "stats").read_text()
            stats.per_cpu[cpu] = parse_cpu_stats(stats.raw[cpu])
        log.info(
            "trace: %d bytes, overrun %d, dropped %d; reader CPU %.1f s",
            stats.bytes_written,
            stats.overrun,
            stats.dropped,
            stats.reader_cpu_s,
        )
        return stats
