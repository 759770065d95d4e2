"""Run a command with transparent huge pages disabled for it.

``python -m apflab.vm.nothp -- CMD ARGS...`` sets ``PR_SET_THP_DISABLE`` and
execs CMD.  The flag is kept across execve(2) and inherited by children, so
QEMU started this way backs guest RAM with 4 KiB pages although it madvises
it MADV_HUGEPAGE.

Why: under a memory cgroup limit, THP-backed guest RAM could not be reclaimed
fast enough: on this host (cgroup v1, TCG guest) QEMU was OOM-killed twice in
a row during the limit step-down with 277 of 299 MiB and 359 of 405 MiB of its
charge in huge pages and swap writeback idle.  Under cgroup v2 in the nested
lab THP stays on: there it caused no OOM and L2 needs it for speed
(:meth:`apflab.pressure.PressureSpec.thp_for`).
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_THP_DISABLE = 41


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m apflab.vm.nothp -- CMD [ARGS...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"apflab.vm.nothp: prctl(PR_SET_THP_DISABLE): {os.strerror(err)}", file=sys.stderr)
        return 127
    try:
        os.execvp(argv[0], argv)  # noqa: S606 (an argv list, never a shell)
    except OSError as err:
        print(f"apflab.vm.nothp: cannot run {argv[0]}: {err.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
