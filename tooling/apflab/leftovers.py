"""Find anything of ours still on the host: the check behind "leave the host as
you found it".  Used by the tests after every run, by ``apflab cleanup --check``
and by CI.

Everything apflab creates is recognisable: run dirs and state records under
the runtime root, QEMU processes whose command line points into it, cgroups
and tracefs instances named ``apflab-*``, swap areas we activated.
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


def find(marker: str | None = None) -> list[str]:
    """One line per leftover; empty means the host is clean.

    :param marker: restrict to things whose name/path contains this (a run id)
    """
    out = qemu_processes(marker)
    root = paths.runtime_root()
    if root.exists():
        for entry in sorted(root.iterdir()):
            if marker is None or marker in entry.name:
                out.append(f"runtime entry {entry}")
        sdir = paths.state_dir()
        if sdir.is_dir():
            for rec in sorted(sdir.glob("*.json")):
                if marker is None or marker in rec.name:
                    out.append(f"run-state record {rec}")
    try:
        info = cgroup.detect()
        for cg in sorted(info.parent.glob("apflab-*")):
            if marker is None or marker in cg.name:
                out.append(f"cgroup {cg}")
    except PreflightError:
        pass  # no memory controller: no cgroup of ours either
    for e in swap.active_swaps():
        if str(root) in e.path or (marker is not None and marker in e.path):
            out.append(f"swap area {e.path}")
    lab_swap = os.environ.get("APFLAB_LAB_SWAP_DEVICE")
    if lab_swap and os.path.exists(lab_swap):
        real = os.path.realpath(lab_swap)
        if any(os.path.realpath(e.path) == real for e in swap.active_swaps()):
            out.append(f"swap area {real} (the lab's swap disk)")
    for base in tracefs.TRACEFS_CANDIDATES:
        inst = base / "instances"
        if inst.is_dir():
            for i in sorted(inst.glob("apflab-*")):
                if marker is None or marker in i.name:
                    out.append(f"tracefs instance {i}")
            break
    return out
