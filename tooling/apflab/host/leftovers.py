"""Find anything of ours still on the host: the check behind "leave the host as
you found it".  Used by the tests after every run, by ``apflab cleanup --check``
and by CI.

Everything apflab creates is recognisable: run dirs and state records under
the runtime root, QEMU processes whose command line points into it, cgroups
and tracefs instances named ``apflab-*``, swap areas we activated, mounts under
the runtime root (ports are QEMU's forwards: they go with its process).
"""

from __future__ import annotations

import os
from pathlib import Path

from apflab import paths
from apflab.errors import PreflightError
from apflab.host import cgroup, swap, tracefs


def qemu_processes(marker: str | None = None) -> list[str]:
    """QEMU processes whose command line mentions our runtime root (or ``marker``)."""
    needle = marker or str(paths.runtime_root())
    found = []
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(needle.encode() in a for a in argv):
            found.append(f"process {pid_dir.name}: {b' '.join(argv[:3]).decode(errors='replace')}")
    return found


def _named(paths_: list[Path], what: str, marker: str | None) -> list[str]:
    return [f"{what} {p}" for p in sorted(paths_) if marker is None or marker in p.name]


def _runtime(marker: str | None) -> list[str]:
    root = paths.runtime_root()
    if not root.exists():
        return []
    out = _named(list(root.iterdir()), "runtime entry", marker)
    sdir = paths.state_dir()
    if sdir.is_dir():
        out += _named(list(sdir.glob("*.json")), "run-state record", marker)
    return out


def _cgroups(marker: str | None) -> list[str]:
    try:
        info = cgroup.detect()
    except PreflightError:
        return []  # no memory controller: no cgroup of ours either
    return _named(list(info.parent.glob("apflab-*")), "cgroup", marker)


def _swaps(marker: str | None) -> list[str]:
    root = str(paths.runtime_root())
    active = swap.active_swaps()
    out = [
        f"swap area {e.path}"
        for e in active
        if root in e.path or (marker is not None and marker in e.path)
    ]
    lab_swap = paths.lab_swap_device()
    if lab_swap and os.path.exists(lab_swap):
        real = os.path.realpath(lab_swap)
        if any(os.path.realpath(e.path) == real for e in active):
            out.append(f"swap area {real} (the lab's swap disk)")
    return out


def _tracefs(marker: str | None) -> list[str]:
    for base in tracefs.TRACEFS_CANDIDATES:
        inst = base / "instances"
        if inst.is_dir():
            return _named(list(inst.glob("apflab-*")), "tracefs instance", marker)
    return []


def _mounts(marker: str | None) -> list[str]:
    """Mounts under our runtime root or named after a run (an image or disk we mounted)."""
    root = str(paths.runtime_root())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[4] for line in lines if len(line.split()) > 4]
    return [
        f"mount {p}"
        for p in points
        if p.startswith(root + "/") or (marker is not None and marker in p)
    ]


def find(marker: str | None = None) -> list[str]:
    """One line per leftover; empty means the host is clean.

    :param marker: restrict to things whose name/path contains this (a run id)
    """
    return (
        qemu_processes(marker)
        + _runtime(marker)
        + _cgroups(marker)
        + _swaps(marker)
        + _tracefs(marker)
        + _mounts(marker)
    )
