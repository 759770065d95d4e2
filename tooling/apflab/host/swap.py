"""Swap areas for host memory pressure: a swap file, or a dedicated disk.

Both register their undo (swapoff, and for a file, removal) the moment they
are made, and are verified in /proc/swaps.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from apflab.errors import HostError, PreflightError
from apflab.process import run
from apflab.undo import Action, RemoveTree, UndoStack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapEntry:
    path: str
    kind: str
    size_kb: int
    used_kb: int
    priority: int


def parse_proc_swaps(text: str) -> list[SwapEntry]:
    """Parse /proc/swaps (header line first, octal escapes in paths)."""
    entries = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5:
            path = parts[0].replace("\\040", " ")
            entries.append(SwapEntry(path, parts[1], int(parts[2]), int(parts[3]), int(parts[4])))
    return entries


def active_swaps() -> list[SwapEntry]:
    return parse_proc_swaps(Path("/proc/swaps").read_text())


def _is_active(path: str) -> bool:
    real = os.path.realpath(path)
    return any(os.path.realpath(e.path) == real for e in active_swaps())


@dataclass
class SwapOff(Action):
    """Deactivate a swap area we activated (pages come back into RAM first)."""

    kind: ClassVar[str] = "swapoff"
    path: str

    def undo(self) -> None:
        if _is_active(self.path):
            run(["swapoff", self.path], timeout=600)


@dataclass(frozen=True)
class SwapArea:
    path: str
    size_kb: int
    priority: int


def _activate(path: str, priority: int, undo: UndoStack) -> SwapArea:
    run(["mkswap", "-q", path], timeout=120)
    result = run(["swapon", "-p", str(priority), path], check=False, timeout=120)
    if not result.ok:
        raise PreflightError(
            f"swapon {path} failed: {result.stderr.strip()} "
            "(swap files need a filesystem that supports them, e.g. ext4/xfs, and root)"
        )
    undo.push(SwapOff(path))
    for e in active_swaps():
        if os.path.realpath(e.path) == os.path.realpath(path):
            log.info("swap on %s: %d MiB, priority %d", path, e.size_kb // 1024, e.priority)
            return SwapArea(path, e.size_kb, e.priority)
    raise HostError(f"swapon {path} succeeded but it is not listed in /proc/swaps")


def add_swap_file(path: Path, size_mb: int, undo: UndoStack, priority: int = 100) -> SwapArea:
    """Create a swap file of ``size_mb`` MiB at ``path`` and activate it."""
    if os.geteuid() != 0:
        raise PreflightError("swap needs root: run as root")
    if path.exists():
        raise PreflightError(f"{path} already exists: choose another swap file path")
    free_mb = shutil.disk_usage(path.parent).free // (1 << 20)
    if free_mb < size_mb + 512:
        raise PreflightError(
            f"cannot create a {size_mb} MiB swap file in {path.parent}: only {free_mb} MiB free"
        )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    undo.push(RemoveTree(str(path)))
    try:
        os.posix_fallocate(fd, 0, size_mb << 20)
    except OSError as err:
        raise PreflightError(f"cannot allocate swap file {path}: {err.strerror}") from err
    finally:
        os.close(fd)
    return _activate(str(path), priority, undo)


#: where the locks of swap devices in use live (one run per device at a time)
LOCK_DIR = Path("/run/lock")


def lock_device(device: str, undo: UndoStack) -> None:
    """Hold the device for this run: a second run that wants it (two runs in one
    lab) is refused at once, naming the holder, instead of failing in mkswap.
    The lock dies with the process (flock), so a SIGKILLed run frees it; the lock
    file is removed when the run lets go."""
    real = os.path.realpath(device)
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = LOCK_DIR / f"apflab-swap-{Path(real).name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise PreflightError(
                f"swap device {device} is in use by another apflab run ({holder}): one run "
                "per swap device at a time; wait for it, or bring up another lab"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed the file as we opened it: take the new one

    def release() -> None:
        path.unlink(missing_ok=True)
        os.close(fd)

    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, run {undo.run_id}".encode(), 0)
    undo.callback(release, f"unlock {path}")


def add_swap_device(device: str, undo: UndoStack, priority: int = 100) -> SwapArea:
    """Format and activate a whole block device we own (e.g. the lab's swap disk)."""
    if not Path(device).exists():
        raise PreflightError(f"swap device {device} does not exist")
    lock_device(device, undo)
    return _activate(os.path.realpath(device), priority, undo)
