"""Host memory pressure on one guest: swap + a memory cgroup around its QEMU.

Order of events (each change registers its undo where it is made):

1. :func:`preflight` — root, a memory controller, sizes that make sense.
   Raises before anything on the host changes.
2. :meth:`Pressure.setup` — swap area (file, or the lab's dedicated disk) and
   an empty child cgroup with no limit.
3. :meth:`Pressure.attach` — QEMU (started paused with ``-S``) moves in, every
   thread verified, before its vCPUs run: all guest memory is charged here.
4. The guest boots without a limit (a squeezed boot is slow and proves nothing).
5. :meth:`Pressure.apply` — the limit drops to the scenario value; the kernel
   reclaims the guest's memory to swap.  The workload then faults it back in.
6. :meth:`Pressure.snapshot` before and after, plus a sampler for peaks:
   the evidence that the host really swapped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.errors import HostError, PreflightError, UsageError
from apflab.host import cgroup, procfs, swap
from apflab.undo import RemoveEmptyDir, RemoveTree, UndoStack

log = logging.getLogger(__name__)

#: below this the QEMU process itself (not guest RAM) does not fit: it thrashes
#: or is OOM-killed, and nothing about async PF is learned.
MIN_LIMIT_MB = 96
#: what a booted Debian test guest keeps resident (kernel, systemd, sshd):
#: the working set must exceed limit - this for the host to swap the set.
GUEST_BASE_MB = 80


@dataclass(frozen=True)
class PressureSpec:
    """How hard to squeeze (built from :class:`apflab.run.scenario.Scenario`).

    :ivar limit_mb: memory limit on the guest's QEMU once booted
    :ivar swap_mb: size of the swap file (ignored when ``swap_device`` is set)
    :ivar swap_device: a whole block device to use as swap (the lab's disk)
    :ivar swap_priority: swapon priority (above any host swap, so ours is used)
    :ivar guest_thp: let QEMU back guest RAM with transparent huge pages; None
        (auto) = off under cgroup v1, on under v2 (see :meth:`thp_for`)
    """

    limit_mb: int
    swap_mb: int
    swap_device: str | None
    guest_thp: bool | None
    swap_priority: int = 100

    def thp_for(self, cgroup_version: int) -> bool:
        """Whether the guest's RAM gets transparent huge pages under this cgroup version.

        Auto is measured, not taste.  cgroup v1 (TCG guest on this host): with
        THP the OOM killer killed QEMU twice in a row during the limit
        step-down, 277 of 299 MiB of the charge in huge pages; without, 3 of 3
        runs clean (:mod:`apflab.vm.nothp`).  cgroup v2 in the nested lab: with
        THP no OOM in 10+ runs, and L1 builds L2's nested page tables from 2 MiB
        pages: 16-22k async PFs in 46-67 s of workload; without THP the same
        scenario gave 9.6-9.8k in 75 s and an L2 boot of 58 s instead of 36-50 s.
        """
        return self.guest_thp if self.guest_thp is not None else cgroup_version != 1


def preflight(spec: PressureSpec, working_set_mb: int, guest_memory_mb: int) -> cgroup.CgroupInfo:
    """Check everything that can be checked without changing the host."""
    check_sizes(spec, working_set_mb, guest_memory_mb)
    if os.geteuid() != 0:
        raise PreflightError("memory pressure needs root (cgroups, swapon): run as root")
    if spec.swap_device is not None and not Path(spec.swap_device).exists():
        raise PreflightError(f"swap device {spec.swap_device} does not exist")
    return cgroup.detect()


def check_sizes(spec: PressureSpec, working_set_mb: int, guest_memory_mb: int) -> None:
    """The sizes must make sense together (pure: usable before a lab boots)."""
    if spec.limit_mb < MIN_LIMIT_MB:
        raise UsageError(
            f"memory limit {spec.limit_mb} MiB is below QEMU's own baseline "
            f"({MIN_LIMIT_MB} MiB): raise --limit"
        )
    if working_set_mb + GUEST_BASE_MB <= spec.limit_mb:
        raise UsageError(
            f"working set {working_set_mb} MiB (+{GUEST_BASE_MB} MiB guest base) fits in the "
            f"{spec.limit_mb} MiB limit, so the host would not swap: raise the working set "
            "or lower --limit"
        )
    if working_set_mb + GUEST_BASE_MB > guest_memory_mb:
        raise UsageError(
            f"working set {working_set_mb} MiB does not fit in the guest's {guest_memory_mb} MiB "
            "(the guest would swap or OOM, not the host): lower it or raise --guest-memory"
        )
    swap_need = working_set_mb + GUEST_BASE_MB - spec.limit_mb
    if spec.swap_device is None and spec.swap_mb < swap_need * 1.5:
        raise UsageError(
            f"swap {spec.swap_mb} MiB is too small for ~{swap_need} MiB swapped out: raise --swap"
        )


@dataclass
class Counters:
    """A snapshot of the evidence that pressure happened."""

    at: float
    cgroup: dict[str, int]
    vmstat: dict[str, int]
    swap_used_kb: int

    def to_dict(self) -> dict[str, Any]:
        return {"cgroup": self.cgroup, "vmstat": self.vmstat, "swap_used_kb": self.swap_used_kb}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Counters:
        return cls(0.0, dict(d["cgroup"]), dict(d["vmstat"]), int(d["swap_used_kb"]))


VMSTAT_KEYS = ("pswpin", "pswpout", "pgmajfault", "pgfault")


@dataclass
class PressureReport:
    before: Counters | None = None
    after: Counters | None = None
    peak_swap_bytes: int = 0
    peak_usage_bytes: int = 0
    events: dict[str, int] = field(default_factory=dict)
    swap_area: str = ""
    cgroup_path: str = ""
    cgroup_version: int = 0
    #: how long the kernel took to reclaim down to the limit
    reclaim_seconds: float | None = None
    #: the limit applied: the scenario's, plus :func:`page_cache_credit` for a
    #: restored guest (0 for a cold one)
    limit_mb: int = 0
    limit_credit_mb: int = 0

    def delta(self, key: str) -> int:
        if self.before is None or self.after is None:
            return 0
        return self.after.vmstat.get(key, 0) - self.before.vmstat.get(key, 0)

    @property
    def swap_out_bytes(self) -> int:
        """Host swap-out during the run: /proc/vmstat pswpout delta, or the
        cgroup's peak swap use when larger (pages swapped before `before`)."""
        return max(self.delta("pswpout") * 4096, self.peak_swap_bytes)

    @property
    def major_faults(self) -> int:
        if self.before is None or self.after is None:
            return 0
        return self.after.cgroup.get("pgmajfault", 0) - self.before.cgroup.get("pgmajfault", 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reclaim_seconds": self.reclaim_seconds,
            "limit_mb": self.limit_mb,
            "limit_credit_mb": self.limit_credit_mb,
            "cgroup": {"version": self.cgroup_version, "path": self.cgroup_path},
            "swap_area": self.swap_area,
            "swap_out_mb": round(self.swap_out_bytes / (1 << 20), 1),
            "pswpout_pages": self.delta("pswpout"),
            "pswpin_pages": self.delta("pswpin"),
            "major_faults": self.major_faults,
            "host_pgmajfault": self.delta("pgmajfault"),
            "peak_swap_mb": round(self.peak_swap_bytes / (1 << 20), 1),
            "peak_usage_mb": round(self.peak_usage_bytes / (1 << 20), 1),
            "peak_swap_bytes": self.peak_swap_bytes,
            "peak_usage_bytes": self.peak_usage_bytes,
            "memory_events": self.events,
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PressureReport:
        """The report again from :meth:`to_dict` (a run.json written in the lab)."""
        return cls(
            before=Counters.from_dict(d["before"]) if d["before"] is not None else None,
            after=Counters.from_dict(d["after"]) if d["after"] is not None else None,
            peak_swap_bytes=int(d["peak_swap_bytes"]),
            peak_usage_bytes=int(d["peak_usage_bytes"]),
            events=dict(d["memory_events"]),
            swap_area=d["swap_area"],
            cgroup_path=d["cgroup"]["path"],
            cgroup_version=int(d["cgroup"]["version"]),
            reclaim_seconds=d["reclaim_seconds"],
            limit_mb=int(d.get("limit_mb", 0)),
            limit_credit_mb=int(d.get("limit_credit_mb", 0)),
        )


#: the key of the record a saved boot keeps (apflab.vm.snapshot ``meta["host"]``)
SAVED_PAGE_CACHE = "cgroup_page_cache_bytes"


def page_cache_credit(saved_host: dict[str, Any] | None, now_bytes: int) -> int:
    """How much to add to the limit of a guest restored from a saved boot, so that
    it is squeezed as its cold boot would have been (bytes, >= 0).

    A cold QEMU reads the guest's kernel, initrd and disk through the page cache
    while it boots, inside the cgroup: 46-52 MiB of clean pages that the squeeze
    reclaims before any guest RAM.  A restored QEMU has not read them, so under
    the same limit it swaps that much more of the guest: 25-28k async PFs and a
    longer workload instead of 16-17k (docs/performance.md, "Saved boots").  The
    saved boot keeps the page cache its cold boot held (:data:`SAVED_PAGE_CACHE`);
    the credit is that minus what the restored one holds now.  None or no record
    (a cold boot): 0.
    """
    if not saved_host or SAVED_PAGE_CACHE not in saved_host:
        return 0
    return max(0, int(saved_host[SAVED_PAGE_CACHE]) - now_bytes)


class Pressure:
    """Swap + memory cgroup for one guest (see the module docstring)."""

    def __init__(self, spec: PressureSpec, info: cgroup.CgroupInfo, undo: UndoStack) -> None:
        self.spec = spec
        self.info = info
        self.undo = undo
        self.cg: cgroup.MemoryCgroup | None = None
        self.report = PressureReport(cgroup_version=info.version)
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def setup(self) -> None:
        if self.spec.swap_device:
            area = swap.add_swap_device(self.spec.swap_device, self.undo, self.spec.swap_priority)
        else:
            root = paths.runtime_root()
            if not root.exists():
                root.mkdir(mode=0o700, parents=True)
                self.undo.push(RemoveEmptyDir(str(root)))
            sdir = root / f"{self.undo.run_id}-swap"
            sdir.mkdir(mode=0o700)
            self.undo.push(RemoveTree(str(sdir)))
            area = swap.add_swap_file(
                sdir / "swapfile", self.spec.swap_mb, self.undo, self.spec.swap_priority
            )
        self.report.swap_area = area.path
        self.cg = cgroup.create(self.info, f"apflab-{self.undo.run_id}", self.undo)
        self.report.cgroup_path = str(self.cg.path)
        log.info("pressure: cgroup v%d %s, swap %s", self.info.version, self.cg.path, area.path)

    def require_cg(self) -> cgroup.MemoryCgroup:
        if self.cg is None:
            raise HostError("pressure: setup() has not run")
        return self.cg

    def attach(self, pid: int) -> list[int]:
        tids = self.require_cg().add_process(pid)
        log.info("pressure: QEMU pid %d and its %d threads are in %s", pid, len(tids), self.cg)
        return tids

    def save_raw(self, directory: Path, label: str) -> None:
        """Keep the raw kernel texts behind a snapshot (evidence, and unit-test fixtures)."""
        cg = self.require_cg()
        directory.mkdir(parents=True, exist_ok=True)
        sources = {
            "memory.stat": cg.path / "memory.stat",
            "memory.events": cg.path / ("memory.events" if cg.version == 2 else "memory.failcnt"),
            "proc-swaps": Path("/proc/swaps"),
            "proc-vmstat": Path("/proc/vmstat"),
        }
        for name, src in sources.items():
            try:
                (directory / f"{label}.{name}").write_text(src.read_text())
            except OSError as err:
                log.warning("pressure: cannot save %s: %s", src, err)

    def snapshot(self) -> Counters:
        cg = self.require_cg()
        vm = procfs.vmstat()
        used = sum(e.used_kb for e in swap.active_swaps() if e.path == self.report.swap_area)
        return Counters(
            time.monotonic(), cg.counters(), {k: vm.get(k, 0) for k in VMSTAT_KEYS}, used
        )

    def page_cache_bytes(self) -> int:
        return self.require_cg().page_cache_bytes()

    def apply(self, credit_bytes: int = 0, settle_s: float = 60.0) -> float:
        """Lower the limit to the scenario value (plus ``credit_bytes``, see
        :func:`page_cache_credit`) and wait until usage is under it.

        :return: seconds the reclaim took
        """
        cg = self.require_cg()
        t0 = time.monotonic()
        credit_mb = credit_bytes >> 20
        self.report.limit_mb = self.spec.limit_mb + credit_mb
        self.report.limit_credit_mb = credit_mb
        limit = self.report.limit_mb << 20
        writes = cg.lower_limit(limit)
        log.debug("pressure: limit reached in %d write(s)", writes)
        while cg.usage_bytes() > limit and time.monotonic() - t0 < settle_s:
            time.sleep(0.2)
        self._start_sampler()
        took = time.monotonic() - t0
        self.report.reclaim_seconds = round(took, 1)
        log.info(
            "pressure: limit %d MiB applied%s; usage %.0f MiB after %.1fs",
            self.report.limit_mb,
            f" ({self.spec.limit_mb} + {credit_mb} MiB of page cache the cold boot held)"
            if credit_mb
            else "",
            cg.usage_bytes() / (1 << 20),
            took,
        )
        return took

    def _start_sampler(self) -> None:
        self._sampler = threading.Thread(target=self._sample, name="pressure-sampler", daemon=True)
        self._sampler.start()
        self.undo.callback(self.stop_sampler, "stop pressure sampler")

    def _sample(self) -> None:
        cg = self.require_cg()
        while not self._stop.wait(0.5):
            try:
                c = cg.counters()
                self.report.peak_swap_bytes = max(self.report.peak_swap_bytes, c["swap_bytes"])
                self.report.peak_usage_bytes = max(self.report.peak_usage_bytes, cg.usage_bytes())
            except OSError:
                return

    def stop_sampler(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)
            self._sampler = None

    def finish(self) -> PressureReport:
        """Stop sampling and record the cgroup's memory events."""
        self.stop_sampler()
        try:
            self.report.events = self.require_cg().memory_events()
        except OSError as err:
            log.warning("pressure: cannot read memory events: %s", err)
        return self.report
