"""Saved boots: a guest booted once, saved to a file, restored for every run.

A cold boot of the guest costs 35-70 s inside the nested lab (the L2 kernel and
systemd under an emulated L1).  A saved boot is that guest at the moment it
first answered SSH, written out by QEMU's migration (``migrate`` to a file) with
a copy of its disk overlay; restoring it (``-incoming defer`` +
``migrate-incoming``) gives the same guest in a few seconds, with the same
kernel, memory contents and devices.  The experiment starts from the same point
either way: the first SSH login after boot.

What a saved boot is keyed by (:func:`identity`): the QEMU binary's version, the
kernel and initrd (sha256), the command line, the root image (path, size,
mtime), RAM, vCPUs, accelerator, CPU model and extra QEMU arguments.  Any change
is a different saved boot; the first run that needs one makes it.  They live in
the machine cache (``<cache>/saved-boots``, 0700, root only; the newest
:data:`KEEP` kept) — inside the lab that is L1's own disk, alive while the lab is.

The saved guest trusts one SSH key, made for it and kept beside it (0600).  A
restored guest is entered once with that key to install the run's own key
(replacing it), then logged into again with the run's key: every run still has
its own key.  Migration streams go through file descriptors passed over QMP
(``getfd``), never through a shell (QEMU's ``exec:`` URIs run ``/bin/sh``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from apflab import paths
from apflab.errors import VMError
from apflab.process import run
from apflab.vm import keys

log = logging.getLogger(__name__)

#: saved boots kept in the cache (the least recently used go first)
KEEP = 6
#: bump when the layout of a saved boot changes: older ones are not used
#: (2: meta.json keeps what the host held for the guest when it was saved)
FORMAT = 2
#: a save or a restore that takes longer is broken (a restore takes seconds)
MIGRATION_TIMEOUT_S = 300.0


class SnapshotError(VMError):
    """Saving or restoring a guest failed (the caller boots it cold instead)."""


@contextlib.contextmanager
def failing_as_snapshot_error(what: str) -> Iterator[None]:
    """Any error of a save or a restore (QMP, SSH, OS, QEMU gone) as one
    :class:`SnapshotError`, so the caller falls back instead of failing the run."""
    try:
        yield
    except SnapshotError:
        raise
    except Exception as err:  # qemu.qmp, paramiko and OS errors are unrelated types
        raise SnapshotError(f"saved boot: {what} failed: {type(err).__name__}: {err}") from err


def drop_cache(path: Path) -> None:
    """Write ``path`` out and drop it from the page cache: QEMU reads and writes
    the memory file from inside the run's memory cgroup, and its cached pages
    would be charged there (reclaimed under the limit, which a cold boot does not
    have)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def store_dir() -> Path:
    """``$APFLAB_SAVED_BOOTS``, else ``<cache>/saved-boots`` (inside the lab the
    cache is read-only and the variable names a writable place)."""
    env = os.environ.get("APFLAB_SAVED_BOOTS")
    return Path(env) if env else paths.cache_dir() / "saved-boots"


@dataclass(frozen=True)
class SavedBoot:
    """One published saved boot (read-only once published)."""

    directory: Path

    @property
    def key(self) -> str:
        return self.directory.name

    @property
    def memory(self) -> Path:
        return self.directory / "memory.bin"

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def console(self) -> Path:
        return self.directory / "console.log"

    def meta(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.directory / "meta.json").read_text())
        return loaded

    def client_key(self) -> keys.ClientKey:
        path = self.directory / "id_ed25519"
        return keys.ClientKey(path, (self.directory / "id_ed25519.pub").read_text().strip())

    def used(self) -> None:
        """Mark as used now (the cache keeps the most recently used)."""
        with contextlib.suppress(OSError):
            os.utime(self.directory)


@functools.cache
def qemu_version(binary: str) -> str:
    return run([binary, "--version"], timeout=30).stdout.splitlines()[0].strip()


def identity(
    *,
    qemu_binary: str,
    kernel: Path,
    initrd: Path | None,
    cmdline: str,
    root_host_key: str,
    memory_mb: int,
    cpus: int,
    accel: str,
    cpu: str,
    extra: list[str],
) -> dict[str, Any]:
    """Everything a saved boot depends on (its key is a digest of this).

    The root image is named by its SSH host key, made when the image is built
    (images are never changed in place: a rebuilt image has a new one).
    """
    return {
        "format": FORMAT,
        "qemu": qemu_version(qemu_binary),
        "host_kernel": Path("/proc/version").read_text().strip(),
        "host_cpu": host_cpu(),
        "kernel_sha256": paths.sha256_file(kernel),
        "initrd_sha256": paths.sha256_file(initrd) if initrd is not None else None,
        "cmdline": cmdline,
        "root_host_key": root_host_key,
        "memory_mb": memory_mb,
        "cpus": cpus,
        "accel": accel,
        "cpu": cpu,
        "extra": extra,
    }


def host_cpu() -> str:
    """The host CPU's model and flags (``-cpu host`` hands them to the guest)."""
    model = flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and not model:
            model = value.strip()
        elif name.strip() == "flags" and not flags:
            flags = value.strip()
        if model and flags:
            break
    return f"{model} | {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def key_of(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


class Store:
    """The saved boots of this machine: look up, create (one process at a time), drop."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or store_dir()

    def lookup(self, key: str) -> SavedBoot | None:
        d = self.root / key
        return SavedBoot(d) if (d / "meta.json").is_file() else None

    @contextlib.contextmanager
    def creating(self, key: str) -> Iterator[Path | None]:
        """Hold the key's lock; yield a private staging dir to fill, or None if
        another process published the saved boot meanwhile.  The staging dir is
        published when the block ends without error and removed otherwise
        (a SIGKILLed creator's is removed by the next one)."""
        if not self.root.exists():
            self.root.mkdir(mode=0o700, parents=True)
        os.chmod(self.root, 0o700)
        with paths.exclusive(self.root / f".{key}.lock"):
            if self.lookup(key) is not None:
                yield None
                return
            for stale in self.root.glob(f".{key}.staging-*"):
                shutil.rmtree(stale, ignore_errors=True)  # we hold the lock: nobody's
            staging = self.root / f".{key}.staging-{os.getpid()}"
            staging.mkdir(mode=0o700)
            try:
                yield staging
                staging.rename(self.root / key)
                os.sync()  # the lab's L1 may be stopped without unmounting its disks
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self.prune()

    def discard(self, key: str) -> None:
        d = self.root / key
        if d.exists():
            gone = self.root / f".{key}.discarded-{os.getpid()}"
            d.rename(gone)  # a guest restored from it keeps its open files
            shutil.rmtree(gone, ignore_errors=True)

    def prune(self, keep: int = KEEP) -> None:
        saved = sorted(
            (d for d in self.root.iterdir() if (d / "meta.json").is_file()),
            key=lambda d: d.stat().st_mtime,
            reverse=True,
        )
        for d in saved[keep:]:
            log.info("saved boots: dropping the least recently used, %s", d.name)
            self.discard(d.name)


def write_meta(
    staging: Path, ident: dict[str, Any], boot_seconds: float, host: dict[str, Any] | None = None
) -> None:
    """``host``: what the host held for the guest at the save (the caller's record,
    e.g. the page cache its cold boot left in the memory cgroup)."""
    meta = {
        "identity": ident,
        "boot_seconds": round(boot_seconds, 1),
        "host": host or {},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "memory_bytes": (staging / "memory.bin").stat().st_size,
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def save(qmp: QEMUMonitorProtocol, dest: Path) -> float:
    """Write the (stopped) guest's state to ``dest``; returns the seconds it took."""
    t0 = time.monotonic()
    qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 30})
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        qmp.send_fd_scm(fd)
        qmp.cmd("getfd", fdname="apflab-save")
    finally:
        os.close(fd)  # QEMU holds its own copy
    qmp.cmd("migrate", uri="fd:apflab-save")
    _wait(qmp, "save")
    drop_cache(dest)
    return time.monotonic() - t0


def restore(qmp: QEMUMonitorProtocol, src: Path) -> float:
    """Load ``src`` into a QEMU started with ``-incoming defer``; returns the seconds."""
    t0 = time.monotonic()
    fd = os.open(src, os.O_RDONLY)
    try:
        qmp.send_fd_scm(fd)
        qmp.cmd("getfd", fdname="apflab-restore")
    finally:
        os.close(fd)
    qmp.cmd("migrate-incoming", uri="fd:apflab-restore")
    _wait(qmp, "restore")
    drop_cache(src)
    return time.monotonic() - t0


def _wait(qmp: QEMUMonitorProtocol, what: str) -> None:
    deadline = time.monotonic() + MIGRATION_TIMEOUT_S
    while True:
        info = qmp.cmd("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            why = info.get("error-desc", status) if isinstance(info, dict) else status
            raise SnapshotError(f"saved boot: {what} failed: {why}")
        if time.monotonic() > deadline:
            raise SnapshotError(
                f"saved boot: {what} not done after {MIGRATION_TIMEOUT_S:.0f}s ({status})"
            )
        time.sleep(0.05)
