"""A QEMU guest as a context manager, driven over QMP (qemu.qmp) and SSH (paramiko).

Modelled on QEMU's ``python/qemu/machine`` (QEMUMachine)::

    with Guest(config, log_dir=outdir, undo=undo) as vm:   # launch + wait until SSH works
        vm.qmp.cmd("query-status")
        vm.run(["uname", "-r"]).stdout

Lifecycle: :meth:`launch` (pre-launch: private run dir, disk overlay, client
key, QMP server socket; spawn; post-launch: QMP handshake), :meth:`wait_ready`
(console watched for panics, a cheap SSH-banner probe, then one SSH login at a
time), :meth:`shutdown` (QMP ``quit`` or ACPI ``system_powerdown`` with a
timeout, then SIGKILL, then reap).  Every host change is registered on the
caller's :class:`~apflab.undo.UndoStack` the moment it is made, so an error, a
timeout or a signal anywhere still leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from apflab import paths
from apflab.errors import (
    BootTimeout,
    GuestPanic,
    PortInUse,
    SSHError,
    VMError,
    VMLaunchError,
)
from apflab.host import kvm
from apflab.process import CmdResult, run
from apflab.retry import POLICIES, Retrier
from apflab.undo import KillProcess, RemoveEmptyDir, RemoveTree, UndoStack, process_start_time
from apflab.vm import keys, snapshot
from apflab.vm.console import ConsoleWatch, tail
from apflab.vm.ssh import SSH, banner_ready

log = logging.getLogger(__name__)

FW_CFG_KEYS = "opt/apflab/authorized_keys"


@dataclass(frozen=True)
class BootSpec:
    """A kernel as an input: what to boot and with which command line."""

    kernel: Path
    initrd: Path | None
    cmdline: str


@dataclass(frozen=True)
class Disk:
    """An extra block device.

    :ivar overlay: boot from a throw-away qcow2 overlay in the run dir, so the
        file itself is never written (images in the cache stay pristine)
    :ivar idle: the guest leaves it alone until told to use it (not mounted, not
        swapped on at boot): a saved boot of the guest may be restored with another
        file of the same size in its place (its identity is its serial and size,
        not its path or content; the guest drops what it cached of it on restore)
    """

    path: Path
    format: str = "raw"
    readonly: bool = False
    overlay: bool = False
    serial: str = ""
    cache: str = "unsafe"
    idle: bool = False


@dataclass(frozen=True)
class GuestConfig:
    """Everything needed to start one guest.

    :ivar root: the root disk (booted through an overlay; never modified)
    :ivar host_key: the guest's SSH host public key line, pinned by the client
    :ivar accel: ``kvm``, ``tcg`` or None to choose from :func:`apflab.host.kvm.probe`
    :ivar cpu: ``-cpu`` model; None: ``host`` under KVM, ``max`` under TCG
    """

    boot: BootSpec
    root: Path
    host_key: str
    name: str = "guest"
    memory_mb: int = 1024
    cpus: int = 2
    accel: str | None = None
    cpu: str | None = None
    disks: tuple[Disk, ...] = ()
    extra_args: tuple[str, ...] = ()
    ssh_user: str = "root"
    boot_timeout: float = 300.0
    #: a booting guest whose console stays silent this long is stuck (seen in
    #: the nested lab: an L2 kernel stopping after its ACPI lines)
    console_silence_timeout: float = 120.0
    #: retry a stuck or panicked boot (the ``guest-boot`` policy of
    #: :mod:`apflab.retry`); False for L1, which the ``lab`` policy retries whole
    retry_boot: bool = True
    #: the kernel is the one under test: a panic while it boots is its own fault
    #: and is not retried (a stuck, silent boot still is)
    kernel_under_test: bool = False
    shutdown_timeout: float = 30.0
    shutdown_method: str = "quit"  # or "powerdown" (ACPI) — both fall back to SIGKILL
    qemu_binary: str = "qemu-system-x86_64"
    #: back guest RAM with transparent huge pages (QEMU's default).  Experiments
    #: choose per cgroup version (:meth:`apflab.pressure.PressureSpec.thp_for`);
    #: off runs QEMU through :mod:`apflab.vm.nothp`
    thp: bool = True
    #: QEMU dies with our process (PR_SET_PDEATHSIG); False only for a lab
    #: deliberately left running by `apflab lab up`
    die_with_parent: bool = True
    #: a panic on the console is fatal even after boot: for infrastructure VMs
    #: (the lab's L1); for a guest under test it is a finding about its kernel
    console_fatal_after_boot: bool = False
    #: restore a saved boot from this store (:mod:`apflab.vm.snapshot`; made on
    #: first use) instead of booting; None: boot every time
    saved_boots: Path | None = None


def free_tcp_port() -> int:
    """A port on 127.0.0.1 that is free right now (QEMU binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def choose_accel(requested: str | None) -> tuple[str, str]:
    """Return ``(accel, one-line reason)``."""
    if requested is not None:
        return requested, f"accelerator {requested} as requested"
    info = kvm.probe()
    if info.usable:
        return "kvm", f"accelerator kvm: {info.reason}"
    return "tcg", f"accelerator tcg (software emulation): {info.reason}"


class Guest:
    """One QEMU guest.  See the module docstring for the lifecycle.

    :param log_dir: where console.log and qemu.log go (kept after the run)
    :param undo: the run's undo stack; a private one is used when None
    :param before_start: called once QEMU is up and QMP connected but before
        the vCPUs run (QEMU starts with ``-S``): the moment to move QEMU into a
        cgroup so that all of the guest's memory is charged there
    :param on_save: called when a cold boot is about to be saved (the guest
        synced, not yet stopped); what it returns is kept with the saved boot
        (``saved_boot["host"]`` of a guest restored from it)
    """

    def __init__(
        self,
        config: GuestConfig,
        log_dir: Path,
        undo: UndoStack | None = None,
        before_start: Callable[[Guest], None] | None = None,
        log_prefix: str | None = None,
        on_save: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self._before_start = before_start
        self._on_save = on_save
        self.name = config.name
        self.log_dir = log_dir
        self._own_undo = undo is None
        self.undo = undo if undo is not None else UndoStack(paths.new_run_id(config.name))
        self._mark = 0
        self.accel, self.accel_reason = choose_accel(config.accel)
        self.run_dir: Path | None = None
        prefix = log_prefix or config.name
        self._log_prefix = prefix
        self.console_log = log_dir / f"{prefix}-console.log"
        self.qemu_log = log_dir / f"{prefix}-qemu.log"
        self.argv: list[str] = []
        self.ssh_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._ssh: SSH | None = None
        self._client_key: keys.ClientKey | None = None
        self._watch = ConsoleWatch(self.console_log, config.name)
        #: the kernel panic line seen on the console after boot (the guest is dead)
        self.panicked: str | None = None
        self.client_key_path: Path | None = None
        self.launched_at = 0.0
        self.boot_seconds: float | None = None
        retry_on: tuple[type[BaseException], ...] = ()
        if config.retry_boot:
            retry_on = (BootTimeout,) if config.kernel_under_test else (BootTimeout, GuestPanic)
        self.boot_retries = Retrier(POLICIES["guest-boot"], retry_on)
        self.exitcode: int | None = None
        #: how the guest came up: "cold" (booted) or "restored" (a saved boot)
        self.boot_mode = "cold"
        #: the saved boot it was restored from (its meta.json plus key), if any
        self.saved_boot: dict[str, Any] | None = None
        #: the console of the boot a restored guest was saved from (its boot lines)
        self.saved_console: Path | None = None
        self._restoring: snapshot.SavedBoot | None = None
        self._fixed_key: keys.ClientKey | None = None

    # -- public surface ----------------------------------------------------
    @property
    def pid(self) -> int:
        if self._proc is None:
            raise VMError(f"{self.name} is not running")
        return self._proc.pid

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        if self._qmp is None:
            raise VMError(f"{self.name}: QMP is not connected")
        return self._qmp

    @property
    def ssh(self) -> SSH:
        if self._ssh is None:
            raise VMError(f"{self.name}: SSH is not connected (call wait_ready first)")
        return self._ssh

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def run(self, argv: Sequence[str], **kwargs: Any) -> CmdResult:
        """Run a command in the guest over SSH (see :meth:`SSH.run`)."""
        self.check_alive()
        kwargs.setdefault("watch", self.check_alive)
        return self.ssh.run(argv, **kwargs)

    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        self.ssh.put(local, remote, mode)

    def get(self, remote: str, local: Path) -> None:
        self.ssh.get(remote, local)

    def vcpu_threads(self) -> dict[int, int]:
        """``{cpu-index: host thread id}`` from QMP ``query-cpus-fast``."""
        cpus = self.qmp.cmd("query-cpus-fast")
        if not isinstance(cpus, list):
            raise VMError(f"{self.name}: unexpected query-cpus-fast reply: {cpus!r}")
        return {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}

    def runstate(self) -> str:
        """QMP ``query-status`` status: running, paused, shutdown, guest-panicked...

        :raises VMLaunchError: QEMU is gone (QMP broke because the process died)
        :raises VMError: QMP failed with QEMU still there
        """
        try:
            status = self.qmp.cmd("query-status")
        except Exception as err:  # qemu.qmp raises several unrelated types
            if self._proc is not None and _exited_within(self._proc, 2.0):
                self.exitcode = self._proc.returncode
                raise VMLaunchError(
                    f"{self.name}: QEMU exited unexpectedly (exit code {self.exitcode})",
                    self.argv,
                    self.exitcode,
                    tail(self.console_log) + "\n" + tail(self.qemu_log, 5),
                ) from err
            raise VMError(f"{self.name}: QMP query-status failed: {err!r}") from err
        return str(status["status"]) if isinstance(status, dict) else "unknown"

    def check_alive(self) -> None:
        """Raise if QEMU died, or, until the guest is up, if the console shows a panic.

        After boot a guest kernel's panic or BUG is a finding about the kernel
        under test, not an infrastructure fault: see :func:`console_faults`.
        """
        if self.boot_seconds is None or self.config.console_fatal_after_boot:
            self._watch.poll()
        elif self.panicked is not None or (line := self._watch.poll_panic()) is not None:
            # the kernel is dead, though QEMU runs on (no pvpanic device): stop waiting
            self.panicked = dead = self.panicked or str(line)
            raise GuestPanic(
                f"{self.name}: the guest kernel panicked: {dead} (see {self.console_log})",
                self.name,
                dead,
            )
        elif self._qmp is not None and self._proc is not None and self._proc.poll() is None:
            # a guest that reset (triple fault) stays paused (-action): SSH to it
            # would hang until its timeout; stop waiting at once instead
            state = self.runstate()
            if state != "running":
                raise VMError(f"{self.name}: the guest stopped running (runstate {state})")
        if self._proc is not None and self._proc.poll() is not None:
            self.exitcode = self._proc.returncode
            raise VMLaunchError(
                f"{self.name}: QEMU exited unexpectedly",
                self.argv,
                self.exitcode,
                tail(self.console_log) + "\n" + tail(self.qemu_log, 5),
            )

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def start(self) -> None:
        """Launch and wait until ready: a saved boot restored when
        ``config.saved_boots`` is set (:meth:`_start_saved`), else a cold boot."""
        if self.config.saved_boots is None:
            self._cold_start()
        else:
            self._start_saved(snapshot.Store(self.config.saved_boots))

    def _cold_start(self) -> None:
        """Boot under the ``guest-boot`` retry policy (:mod:`apflab.retry`) when
        ``config.retry_boot``: a boot that got stuck or panicked is tried again;
        every failed attempt is logged, kept in :attr:`boot_retries`, and its
        console log kept apart (``<name>-console.attemptN.log``)."""

        def attempt(number: int) -> None:
            self.launch()
            self.wait_ready()

        def set_aside(err: BaseException) -> None:
            self.shutdown()
            number = len(self.boot_retries.attempts)
            kept = self.console_log.with_name(
                self.console_log.name.replace(".log", f".attempt{number}.log")
            )
            self.console_log.replace(kept)

        self.boot_retries.run(attempt, between=set_aside)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- saved boots (apflab.vm.snapshot) -------------------------------------
    def _identity(self) -> dict[str, Any]:
        cfg = self.config
        disks = []
        for d in cfg.disks:
            if d.idle:
                if not d.serial:  # the guest finds it (and drops its cache) by serial
                    raise VMError(f"{self.name}: idle disk {d.path} has no serial")
                mode = "ro" if d.readonly else "rw"
                disks.append(f"idle:{d.serial}:{d.format}:{mode}:{d.path.stat().st_size}")
            elif d.readonly:
                disks.append(f"{d.path}:{d.format}")
            else:
                raise VMError(
                    f"{self.name}: a saved boot needs every extra disk read-only or idle ({d.path})"
                )
        return snapshot.identity(
            qemu_binary=cfg.qemu_binary,
            kernel=cfg.boot.kernel,
            initrd=cfg.boot.initrd,
            cmdline=cfg.boot.cmdline,
            root_host_key=cfg.host_key,
            memory_mb=cfg.memory_mb,
            cpus=cfg.cpus,
            accel=self.accel,
            cpu=self._cpu_model(),
            extra=[*cfg.extra_args, *disks],
        )

    def _start_saved(self, store: snapshot.Store) -> None:
        """Restore the saved boot of this configuration, saving it first if
        there is none.  A saved boot that fails to restore is dropped and made
        again, once; if the fresh one fails too, the guest boots cold (the run
        goes on; ``boot_mode`` says which it got).  A cold boot's own failures
        (the kernel under test, the host) are not a saved boot's: they propagate."""
        ident = self._identity()
        key = snapshot.key_of(ident)
        saved = store.lookup(key)
        if saved is not None:
            try:
                self._restore(saved)
                return
            except snapshot.SnapshotError as err:
                self._abandon(store, key, f"saved boot {key} did not restore ({err}): saving anew")
        try:
            self._restore(self._save(store, key, ident))
            return
        except snapshot.SnapshotError as err:
            self._abandon(store, key, f"the new saved boot {key} failed ({err})")
        log.warning("%s: booting cold instead of from a saved boot", self.name)
        self._cold_start()

    def _abandon(self, store: snapshot.Store, key: str, why: str) -> None:
        log.warning("%s: %s", self.name, why)
        self.shutdown()
        self.boot_seconds = None
        self.boot_mode = "cold"
        self.saved_boot = None
        store.discard(key)

    def _save(self, store: snapshot.Store, key: str, ident: dict[str, Any]) -> snapshot.SavedBoot:
        """Boot cold (with the saved boot's own key), save the guest, stop it."""
        with store.creating(key) as staging:
            if staging is not None:
                log.info("%s: no saved boot %s yet: booting to save one", self.name, key)
                self._fixed_key = keys.generate_client_key(staging, f"apflab-saved-{key}")
                try:
                    self._cold_start()  # its failures are the boot's, not the save's
                    cold_s = self.boot_seconds or 0.0
                    with snapshot.failing_as_snapshot_error("save"):
                        seconds = self._write_saved(staging, ident, cold_s)
                    log.info(
                        "%s: saved boot %s written in %.1fs (cold boot %.1fs)",
                        self.name,
                        key,
                        seconds,
                        cold_s,
                    )
                finally:
                    self._fixed_key = None
                    self.shutdown()
                    self.boot_seconds = None
        saved = store.lookup(key)
        if saved is None:
            raise snapshot.SnapshotError(f"{self.name}: saved boot {key} was not published")
        return saved

    def _write_saved(self, staging: Path, ident: dict[str, Any], cold_s: float) -> float:
        """Save the running guest into ``staging``; returns the migration's seconds."""
        self.run(["sync"], timeout=60)
        host = self._on_save() if self._on_save is not None else {}
        self.qmp.cmd("stop")
        seconds = snapshot.save(self.qmp, staging / "memory.bin")
        disk = staging / "disk.qcow2"
        shutil.copyfile(self._overlays[self.config.root], disk)
        # backed by the root as named, not as resolved: inside the lab it
        # is a symlink to a disk whose /dev name may change between labs
        run(
            [
                *("qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw"),
                *("-b", os.path.abspath(self.config.root), str(disk)),
            ]
        )
        shutil.copyfile(self.console_log, staging / "console.log")
        snapshot.write_meta(staging, ident, cold_s, host)
        return seconds

    def _restore(self, saved: snapshot.SavedBoot) -> None:
        """Start QEMU on the saved state, then swap the saved key for the run's.

        :raises snapshot.SnapshotError: whatever went wrong (QEMU 7.2 exits when an
            incoming migration fails, so QMP, SSH and OS errors all mean "this saved
            boot does not restore here")
        """
        saved.used()
        run_key: keys.ClientKey | None = None
        with snapshot.failing_as_snapshot_error("restore"):
            self._restoring = saved
            try:
                self.launch()
            finally:
                self._restoring = None
            run_key = self._client_key
            self._client_key = saved.client_key()
            try:
                self.wait_ready(timeout=120)
                assert self.run_dir is not None and run_key is not None
                self.ssh.put(self.run_dir / "authorized_keys", "/root/.ssh/authorized_keys", 0o600)
                # the guest's clock stood still while it was saved
                self.run(["date", "-u", "-s", f"@{time.time():.3f}"], timeout=30)
                # an idle disk is another file now: drop what the guest read of the
                # old one at boot (udev's probe of its superblock)
                idle = [f"/dev/disk/by-id/virtio-{d.serial}" for d in self.config.disks if d.idle]
                if idle:
                    self.run(["blockdev", "--flushbufs", *idle], timeout=60)
                self.ssh.close()
                self._ssh = None
            finally:
                self._client_key = run_key
            self.boot_seconds = None
            self.wait_ready(timeout=120)
        self.saved_console = self.log_dir / f"{self._log_prefix}-console.saved-boot.log"
        shutil.copyfile(saved.console, self.saved_console)
        self.boot_mode = "restored"
        self.saved_boot = {"key": saved.key, **saved.meta()}

    def launch(self) -> None:
        """Start QEMU and complete the QMP handshake (does not wait for boot).

        A forward port taken between choosing it and QEMU binding it is retried
        with a fresh port (the ``qemu-port`` policy of :mod:`apflab.retry`).
        """
        self._mark = len(self.undo)
        log.info("%s: %s", self.name, self.accel_reason)
        self._pre_launch()

        def spawn(number: int) -> None:
            self.ssh_port = free_tcp_port()
            self.argv = self._build_argv()
            self._spawn()
            self._post_launch()

        def reap(err: BaseException) -> None:
            self._reset_qmp()
            self._wait_or_kill()

        Retrier(POLICIES["qemu-port"], (PortInUse,)).run(spawn, between=reap)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until SSH login works, watching the console for panics.

        A cheap banner probe runs every 0.5 s; a full SSH login is tried only
        once a banner is seen, and only one at a time.
        """
        budget = self.config.boot_timeout if timeout is None else timeout
        deadline = self.launched_at + budget
        if self._client_key is None:
            raise VMError(f"{self.name}: wait_ready() before launch()")
        key = self._client_key.load()
        host_key = keys.parse_public_key(self.config.host_key)
        last_err: Exception | None = None
        while True:
            self.check_alive()
            now = time.monotonic()
            if now > deadline:
                raise BootTimeout(
                    f"{self.name}: no SSH login within {budget:.0f}s of launch "
                    f"(last error: {last_err}); console tail:\n{tail(self.console_log)}"
                )
            silent = now - max(self._watch.last_growth, self.launched_at)
            if silent > self.config.console_silence_timeout:
                raise BootTimeout(
                    f"{self.name}: boot stuck: console silent for {silent:.0f}s after "
                    f"{self._watch.last_line[:160]!r} (see {self.console_log})"
                )
            if banner_ready("127.0.0.1", self.ssh_port, timeout=2.0):
                ssh = SSH(
                    "127.0.0.1", self.ssh_port, self.config.ssh_user, key, host_key, self.name
                )
                try:
                    ssh.connect(timeout=max(5.0, min(60.0, deadline - now)))
                    ssh.run(["true"], timeout=max(5.0, deadline - time.monotonic()))
                except (SSHError, VMError) as err:
                    ssh.close()
                    last_err = err
                    time.sleep(1.0)
                    continue
                self._ssh = ssh
                self.boot_seconds = time.monotonic() - self.launched_at
                log.info("%s: SSH ready %.1fs after launch", self.name, self.boot_seconds)
                return
            time.sleep(0.5)

    def detach(self) -> None:
        """Let go of a running guest without stopping it (`apflab lab up`).

        Closes SSH and QMP; the run-state record, adopted by the QEMU process,
        keeps what is needed to stop it later.
        """
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        self._reset_qmp()
        self._proc = None

    def shutdown(self) -> None:
        """Stop the guest: graceful with a timeout, then SIGKILL, then reap.

        Always finishes by undoing this guest's host changes (process, run dir).
        """
        try:
            if self._ssh is not None:
                self._ssh.close()
                self._ssh = None
            if self.is_running():
                self._graceful()
        finally:
            self._reset_qmp()
            if self._proc is not None:
                self._wait_or_kill()
            if self._own_undo:
                self.undo.unwind()
            else:
                self.undo.unwind_to(self._mark)

    # -- internals ---------------------------------------------------------
    def _pre_launch(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        root = paths.runtime_root()
        if not root.exists():
            root.mkdir(mode=0o700, parents=True)
            self.undo.push(RemoveEmptyDir(str(root)))
        run_dir = Path(os.path.realpath(root)) / f"{self.undo.run_id}-{self.name}"
        run_dir.mkdir(mode=0o700)
        self.undo.push(RemoveTree(str(run_dir)))
        self.run_dir = run_dir
        self._client_key = self._fixed_key or keys.generate_client_key(
            run_dir, f"apflab-{self.undo.run_id}"
        )
        self.client_key_path = self._client_key.path
        (run_dir / "authorized_keys").write_text(self._client_key.public_line + "\n")
        self._overlays: dict[Path, Path] = {}
        for disk in (Disk(self.config.root, overlay=True), *self.config.disks):
            if disk.overlay:
                source = disk
                if self._restoring is not None and disk.path == self.config.root:
                    source = Disk(self._restoring.disk, format="qcow2", overlay=True)
                self._overlays[disk.path] = self._make_overlay(source)

    def _make_overlay(self, disk: Disk) -> Path:
        assert self.run_dir is not None
        if not disk.path.exists():
            raise VMError(f"{self.name}: disk image {disk.path} does not exist")
        overlay = self.run_dir / f"{disk.path.stem}.overlay.qcow2"
        run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(disk.path.resolve()),
                "-F",
                disk.format,
                str(overlay),
            ]
        )
        return overlay

    def _drive_args(self, disk: Disk, index: int) -> list[str]:
        path = self._overlays.get(disk.path, disk.path)
        fmt = "qcow2" if disk.path in self._overlays else disk.format
        opts = f"file={path},if=none,id=d{index},format={fmt},cache={disk.cache}"
        if disk.readonly:
            opts += ",readonly=on"
        dev = f"virtio-blk-pci,drive=d{index}"
        if disk.serial:
            dev += f",serial={disk.serial}"
        return ["-drive", opts, "-device", dev]

    def _cpu_model(self) -> str:
        return self.config.cpu or ("host" if self.accel == "kvm" else "max")

    def _build_argv(self) -> list[str]:
        cfg = self.config
        assert self.run_dir is not None
        cpu = self._cpu_model()
        accel = "tcg,thread=multi" if self.accel == "tcg" else self.accel
        argv = [
            cfg.qemu_binary,
            "-name",
            f"{cfg.name},debug-threads=on",
            "-no-user-config",
            "-nodefaults",
            "-machine",
            "q35",
            "-accel",
            accel,
            "-cpu",
            cpu,
            "-m",
            str(cfg.memory_mb),
            "-smp",
            str(cfg.cpus),
            "-display",
            "none",
            "-chardev",
            f"socket,id=qmp,path={self.run_dir / 'qmp.sock'},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-chardev",
            f"file,id=console,path={self.console_log}",
            "-serial",
            "chardev:console",
            "-kernel",
            str(cfg.boot.kernel),
            "-append",
            cfg.boot.cmdline,
            "-netdev",
            f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device",
            "virtio-net-pci,netdev=net0,romfile=",
            "-fw_cfg",
            f"name={FW_CFG_KEYS},file={self.run_dir / 'authorized_keys'}",
            # A guest reset (a triple fault included) or poweroff leaves the VM
            # paused in runstate "shutdown" instead of QEMU exiting: the state
            # stays inspectable over QMP, and shutdown() still ends with `quit`.
            "-action",
            "reboot=shutdown,shutdown=pause,panic=pause",
            # the CPU state at every reset, before it is reset: a triple fault's
            # post-mortem (registers read after the pause are already reset)
            "-d",
            "cpu_reset",
            "-D",
            str(self.log_dir / f"{self._log_prefix}-cpu-reset.log"),
            "-S",  # vCPUs start on QMP `cont`, after the before_start hook
        ]
        if cfg.boot.initrd is not None:
            argv += ["-initrd", str(cfg.boot.initrd)]
        for i, disk in enumerate((Disk(cfg.root, overlay=True), *cfg.disks)):
            argv += self._drive_args(disk, i)
        argv += list(cfg.extra_args)
        if self._restoring is not None:
            argv += ["-incoming", "defer"]
        return argv

    def _spawn(self) -> None:
        log.debug("%s: launching %s", self.name, shlex.join(self.argv))
        self.console_log.write_bytes(b"")
        self._watch = ConsoleWatch(self.console_log, self.name)
        # setpriv --pdeathsig: if our process dies without unwinding (SIGKILL),
        # the kernel kills QEMU too; the run-state record covers the rest.
        argv = list(self.argv)
        if not self.config.thp:
            argv = [sys.executable, "-m", "apflab.vm.nothp", "--", *argv]
        if self.config.die_with_parent:
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        with self.qemu_log.open("wb") as qlog:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=qlog,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.launched_at = time.monotonic()
        self.undo.push(
            KillProcess(
                self._proc.pid,
                _start_time_soon(self._proc.pid),
                f"{self.name} QEMU",
                grace_s=self.config.shutdown_timeout,
            )
        )

    def _post_launch(self) -> None:
        assert self._proc is not None and self.run_dir is not None
        deadline = time.monotonic() + 30
        sock = self.run_dir / "qmp.sock"
        while True:
            try:
                if not sock.exists():
                    raise FileNotFoundError(sock)
                self._qmp = QEMUMonitorProtocol(str(sock), nickname=self.name)
                self._qmp.connect()
                break
            except Exception as err:  # qemu.qmp raises several unrelated types here
                self._reset_qmp()
                time.sleep(0.1)
                if self._proc.poll() is not None:
                    self.exitcode = self._proc.returncode
                    log_tail = tail(self.qemu_log, 10) + "\n" + tail(self.console_log, 10)
                    cls = PortInUse if "host forwarding" in log_tail else VMLaunchError
                    raise cls(
                        f"{self.name}: QEMU exited during launch",
                        self.argv,
                        self.exitcode,
                        log_tail,
                    ) from err
                if time.monotonic() > deadline:
                    raise VMLaunchError(
                        f"{self.name}: QEMU did not connect to QMP within 30s",
                        self.argv,
                        None,
                        tail(self.qemu_log, 10),
                    ) from err
        self._qmp.settimeout(30)
        if self._before_start is not None:
            self._before_start(self)  # before a restore too: its memory is charged there
        if self._restoring is not None:
            # QEMU loads a file in its main loop and answers no QMP until done
            self._qmp.settimeout(snapshot.MIGRATION_TIMEOUT_S)
            seconds = snapshot.restore(self._qmp, self._restoring.memory)
            self._qmp.settimeout(30)
            log.info("%s: saved boot %s loaded in %.1fs", self.name, self._restoring.key, seconds)
        self._qmp.cmd("cont")
        status = self._qmp.cmd("query-status")
        log.info(
            "%s: QEMU pid %d up, QMP status %s, ssh on 127.0.0.1:%d",
            self.name,
            self._proc.pid,
            status,
            self.ssh_port,
        )

    def _reset_qmp(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None

    def _graceful(self) -> None:
        method = self.config.shutdown_method
        try:
            if method == "powerdown" and self.panicked is None:  # a dead kernel powers nothing down
                # ACPI poweroff; the guest's poweroff pauses the VM (see -action),
                # then `quit` ends QEMU.
                self.qmp.cmd("system_powerdown")
                deadline = time.monotonic() + self.config.shutdown_timeout
                while time.monotonic() < deadline and self.runstate() != "shutdown":
                    time.sleep(0.5)
            self.qmp.cmd("quit")
        except Exception as err:  # QMP gone or broken: fall through to SIGKILL
            log.warning("%s: QMP %s failed (%s); will kill", self.name, method, err)

    def _wait_or_kill(self) -> None:
        assert self._proc is not None
        try:
            self.exitcode = self._proc.wait(timeout=self.config.shutdown_timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s: QEMU still running %.0fs after %s: SIGKILL",
                self.name,
                self.config.shutdown_timeout,
                self.config.shutdown_method,
            )
            self._proc.kill()
            self.exitcode = self._proc.wait(timeout=30)


def _exited_within(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def _start_time_soon(pid: int) -> int | None:
    # /proc/PID/stat exists as soon as fork() returns; the value pins this
    # exact process so a later cleanup never signals a recycled pid.
    return process_start_time(pid)
