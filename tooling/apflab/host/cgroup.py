"""Memory cgroups for a guest's QEMU: v2 and v1 behind one small interface.

Reading is kept apart from parsing: the ``parse_*`` functions take text and
are tested on text captured from real hosts (tests/unit/fixtures/host/).

Usage::

    info = cgroup.detect()                       # which version, where
    cg = cgroup.create(info, "apflab-<run>", undo) # undo registered at once
    cg.add_process(qemu_pid)                     # every thread, verified
    cg.set_limit(256 << 20)                      # memory.max / limit_in_bytes
    cg.memory_stat()                             # {"pswpout"...} parsed
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from apflab.errors import HostError, PreflightError
from apflab.host.procfs import parse_flat_keyed
from apflab.undo import Action, UndoStack

log = logging.getLogger(__name__)


# -- parsers (pure) ----------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str
    super_options: tuple[str, ...]


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/self/mountinfo into mount point, fs type and super options."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mountpoint = fields[4].replace("\\040", " ")
        mounts.append(Mount(mountpoint, rfields[0], tuple(rfields[2].split(","))))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Parse /proc/PID/cgroup: ``{controller: path}``; v2's entry is under ``""``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


# -- detection -----------------------------------------------------------------
@dataclass(frozen=True)
class CgroupInfo:
    """Where a memory cgroup for our guest can be created.

    :ivar version: 1 or 2 (of the hierarchy holding the memory controller)
    :ivar parent: the directory in which to create the child group
    :ivar swap_accounting: whether swap use is visible/limitable per group
    """

    version: int
    mount: Path
    parent: Path
    swap_accounting: bool


def detect(mountinfo: str | None = None, self_cgroup: str | None = None) -> CgroupInfo:
    """Find the memory controller (v2 preferred when both are mounted)."""
    mounts = parse_mountinfo(mountinfo or Path("/proc/self/mountinfo").read_text())
    own = parse_proc_cgroup(self_cgroup or Path("/proc/self/cgroup").read_text())
    for m in mounts:
        if m.fstype == "cgroup2":
            root = Path(m.mountpoint)
            controllers_file = root / "cgroup.controllers"
            if controllers_file.exists() and "memory" in controllers_file.read_text().split():
                # v2 accounts swap per group when the kernel has CONFIG_MEMCG_SWAP;
                # MemoryCgroup.set_limit checks memory.swap.max on the child itself.
                return CgroupInfo(2, root, root, True)
    for m in mounts:
        if m.fstype == "cgroup" and "memory" in m.super_options:
            root = Path(m.mountpoint)
            rel = own.get("memory", "/").lstrip("/")
            parent = root / rel if rel else root
            swap = (parent / "memory.memsw.limit_in_bytes").exists()
            return CgroupInfo(1, root, parent, swap)
    raise PreflightError(
        "no cgroup memory controller is mounted (neither cgroup2 with 'memory' nor a v1 "
        "memory hierarchy): boot with cgroup_enable=memory or mount one"
    )


# -- undo action -------------------------------------------------------------
@dataclass
class RemoveCgroup(Action):
    """Remove our cgroup; processes still in it are moved to the parent first."""

    kind: ClassVar[str] = "remove-cgroup"
    path: str
    version: int

    def undo(self) -> None:
        p = Path(self.path)
        if not p.is_dir():
            return
        procs_file = p / "cgroup.procs"
        target = p.parent / "cgroup.procs"
        deadline = time.monotonic() + 10
        while True:
            pids = _read_pids(procs_file)
            for pid in pids:
                with contextlib.suppress(OSError):
                    target.write_text(str(pid))
            try:
                p.rmdir()
                return
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise HostError(f"cannot remove cgroup {p}: {err.strerror}") from err
            time.sleep(0.1)


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


# -- the cgroup ----------------------------------------------------------------
class MemoryCgroup:
    """One memory cgroup we created (see :func:`create`)."""

    def __init__(self, info: CgroupInfo, path: Path) -> None:
        self.info = info
        self.path = path

    @property
    def version(self) -> int:
        return self.info.version

    def _write(self, name: str, value: str) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError as err:
            raise HostError(
                f"cannot write {value!r} to {self.path / name}: {err.strerror}"
            ) from err

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def add_process(self, pid: int) -> list[int]:
        """Move a process (every thread) in; return the thread ids verified inside."""
        if self.version == 1:
            # Bring the charges along (v1 only; deprecated but present up to 6.x).
            with contextlib.suppress(OSError):
                (self.path / "memory.move_charge_at_immigrate").write_text("3")
        self._write("cgroup.procs", str(pid))
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        members_file = "tasks" if self.version == 1 else "cgroup.threads"
        inside = set(_read_pids(self.path / members_file))
        if self.version == 2 and not inside:
            # a v2 leaf in the default (domain) mode lists threads via cgroup.threads
            inside = {t for t in tids if self._thread_in(pid, t)}
        missing = sorted(set(tids) - inside)
        if missing:
            for tid in missing:  # v1 can move threads one by one
                with contextlib.suppress(OSError):
                    (self.path / ("tasks" if self.version == 1 else "cgroup.threads")).write_text(
                        str(tid)
                    )
            inside = set(_read_pids(self.path / members_file))
            missing = sorted(set(tids) - inside)
        if missing:
            raise HostError(f"threads {missing} of pid {pid} are not in cgroup {self.path}")
        return sorted(tids)

    def _thread_in(self, pid: int, tid: int) -> bool:
        try:
            own = parse_proc_cgroup(Path(f"/proc/{pid}/task/{tid}/cgroup").read_text())
        except OSError:
            return False
        rel = "/" + self.path.relative_to(self.info.mount).as_posix()
        return own.get("" if self.version == 2 else "memory") == rel

    def set_limit(self, limit_bytes: int | None, swap_bytes: int | None = None) -> None:
        """Set the memory limit (None: unlimited) and optionally the swap limit."""
        if self.version == 2:
            self._write("memory.max", "max" if limit_bytes is None else str(limit_bytes))
            if swap_bytes is not None:
                self._write("memory.swap.max", str(swap_bytes))
        else:
            value = "-1" if limit_bytes is None else str(limit_bytes)
            if swap_bytes is not None and self.info.swap_accounting and limit_bytes is not None:
                # memsw >= limit must hold at every step: raise memsw first when growing.
                self._write("memory.memsw.limit_in_bytes", "-1")
                self._write("memory.limit_in_bytes", value)
                self._write("memory.memsw.limit_in_bytes", str(limit_bytes + swap_bytes))
            else:
                self._write("memory.limit_in_bytes", value)

    def lower_limit(self, limit_bytes: int, timeout_s: float = 120.0) -> int:
        """Lower the limit to ``limit_bytes``, letting the kernel reclaim on the way.

        v2 accepts any value and reclaims in the background.  v1 refuses
        (EBUSY) a limit it cannot reclaim down to within a few tries, so it is
        walked down in steps of an eighth of the way each.

        :return: the number of limit writes it took
        """
        if self.version == 2:
            self.set_limit(limit_bytes)
            return 1
        deadline = time.monotonic() + timeout_s
        writes = 0
        while True:
            usage = self.usage_bytes()
            step = (
                limit_bytes
                if usage <= limit_bytes
                else max(limit_bytes, usage - max((usage - limit_bytes) // 8, 16 << 20))
            )
            try:
                writes += 1
                (self.path / "memory.limit_in_bytes").write_text(str(step))
            except OSError as err:
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise HostError(
                        f"cannot lower {self.path}/memory.limit_in_bytes to {step} "
                        f"(usage {usage}): {err.strerror}"
                    ) from err
                time.sleep(0.2)
                continue
            if step == limit_bytes:
                return writes

    def __repr__(self) -> str:
        return f"cgroup v{self.version} {self.path}"

    def memory_stat(self) -> dict[str, int]:
        return parse_flat_keyed(self._read("memory.stat"))

    def memory_events(self) -> dict[str, int]:
        """v2 memory.events; v1: failcnt and the OOM control flags in the same shape."""
        if self.version == 2:
            return parse_flat_keyed(self._read("memory.events"))
        events = {"max": int(self._read("memory.failcnt").strip() or 0)}
        oom = parse_flat_keyed(self._read("memory.oom_control"))
        events["oom_kill"] = oom.get("oom_kill", 0)
        return events

    def page_cache_bytes(self) -> int:
        return page_cache_of(self.memory_stat(), self.version)

    def usage_bytes(self) -> int:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        return int(self._read(name).strip())

    def counters(self) -> dict[str, int]:
        """Swap and fault counters normalised across versions.

        ``pgmajfault`` (both), ``swap_bytes`` (current swap use), and for v2
        ``pswpout``-like data is not per-cgroup: see :func:`swap_out_pages`.
        """
        stat = self.memory_stat()
        if self.version == 2:
            return {
                "pgmajfault": stat.get("pgmajfault", 0),
                "swap_bytes": int(self._read("memory.swap.current").strip())
                if (self.path / "memory.swap.current").exists()
                else 0,
                "anon_bytes": stat.get("anon", 0),
            }
        return {
            "pgmajfault": stat.get("total_pgmajfault", stat.get("pgmajfault", 0)),
            "swap_bytes": stat.get("total_swap", stat.get("swap", 0)),
            "anon_bytes": stat.get("total_rss", stat.get("rss", 0)),
        }


def page_cache_of(stat: dict[str, int], version: int) -> int:
    """File pages charged to a cgroup, from its memory.stat (v2 ``file``, v1
    ``total_cache``, else ``cache``)."""
    if version == 2:
        return stat.get("file", 0)
    return stat.get("total_cache", stat.get("cache", 0))


def check_children(info: CgroupInfo) -> None:
    """A child of ``info.parent`` gets a memory controller (v2: only when the parent
    enables it in ``cgroup.subtree_control``).

    :raises PreflightError: it would not, and how to enable it
    """
    if info.version != 2:
        return
    subtree = info.parent / "cgroup.subtree_control"
    enabled = subtree.read_text().split() if subtree.exists() else []
    if "memory" not in enabled:
        raise PreflightError(
            f"the memory controller is not enabled for children of {info.parent} "
            f"(echo +memory > {subtree})"
        )


def create(info: CgroupInfo, name: str, undo: UndoStack) -> MemoryCgroup:
    """Create the child group ``name`` under ``info.parent`` and register its removal."""
    path = info.parent / name
    check_children(info)
    try:
        path.mkdir()
    except OSError as err:
        raise PreflightError(f"cannot create cgroup {path}: {err.strerror}") from err
    undo.push(RemoveCgroup(str(path), info.version))
    return MemoryCgroup(info, path)
