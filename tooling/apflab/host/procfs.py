"""Parsers for the kernel's flat ``key value`` texts, and readers of the host's.

The same format is written by a memory cgroup's ``memory.stat`` and
``memory.events``, by ``/proc/vmstat`` on the host and inside a guest: one
parser (pure, tested on captured text) serves them all.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (memory.stat, memory.events, /proc/vmstat)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                out[parts[0]] = int(parts[1])
    return out


def vmstat() -> dict[str, int]:
    """The host's /proc/vmstat."""
    return parse_flat_keyed(Path("/proc/vmstat").read_text())


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo → ``{name: kB}``."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and fields and fields[0].isdigit():
            out[name.strip()] = int(fields[0])
    return out


def mem_available_mb() -> int:
    """What the host could still give a VM without swapping (MemAvailable)."""
    return parse_meminfo(Path("/proc/meminfo").read_text())["MemAvailable"] // 1024
