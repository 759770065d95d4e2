"""The nested lab: real KVM on hosts whose /dev/kvm cannot run stock guests.

L0 (this host) runs L1 — a Debian kernel with kvm_amd — under QEMU TCG with an
emulated AMD SVM CPU (``-accel tcg,thread=multi -cpu EPYC,+svm``).  Inside L1,
QEMU ``-accel kvm -cpu host`` runs L2 guests on real KVM, which produce real
async page faults.  Inside L1 the ordinary, bare-metal code path of apflab
runs unchanged: the lab is just another KVM host.

What L1 gets, as virtio disks (by serial, see :data:`SERIALS`):

* its own root (a throw-away overlay over the cached lab image);
* ``apflab-assets``: a small ext4 built per lab start holding the current
  apflab source and tests, the guest image's kernel/initrd/host key/manifest
  and any kernel under test — so a code change never needs an image rebuild;
* ``apflab-groot``: the cached guest root image, read-only (L2s boot from
  overlays over it);
* ``apflab-swap``: a sparse raw disk for L1's swap (host memory pressure);
* ``apflab-saved``: the machine's saved L2 boots (:mod:`apflab.vm.snapshot`), an
  ext4 disk in the machine cache kept from lab to lab (one lab at a time has it).

Use::

    with Lab(LabConfig(), log_dir, undo) as lab:
        lab.run(["apflab", "doctor"], on_output=print)
        lab.fetch("/root/results/x", local_dir)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from apflab import paths
from apflab.errors import BootTimeout, GuestPanic, LabError
from apflab.images.build import ensure
from apflab.lab.assets import (
    ASSETS_MOUNT,
    L1_ENV,
    LAB_PYTHON,
    SAVED_BOOTS_MOUNT,
    SERIALS,
    build_assets,
    saved_boots_disk,
)
from apflab.process import CmdResult
from apflab.undo import RemoveTree, UndoStack
from apflab.vm.qemu import BootSpec, Disk, Guest, GuestConfig
from apflab.vm.ssh import SSH

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabConfig:
    """Sizing and behaviour of the lab (defaults fit 2 cores / 24 GiB).

    :ivar memory_mb: L1 RAM; holds L1 itself (~300 MiB), the L2's RAM and page cache
    :ivar cpus: L1 vCPUs (one TCG thread each).  1 by default: with 2, L1's
        kernel panicked ("TASK stack guard page was hit", 1 in 6 runs) and
        2-vCPU L2s reset or hung; with 1 L1 vCPU and 1-vCPU L2s, 6 of 6 runs
        passed at the same speed, on one host core (docs/calibration.md)
    :ivar accel: ``tcg`` (emulated SVM) or ``kvm`` (nested on a hardware-KVM host)
    :ivar swap_mb: size of L1's swap disk
    :ivar kernels: kernels to put on the assets disk (kernels/NAME inside; `lab up
        --kernel`); a run ships its own files with :func:`ship`
    """

    memory_mb: int = 3072
    cpus: int = 1
    accel: str = "tcg"
    swap_mb: int = 2048
    boot_timeout: float = 240.0
    guest_image: str = "guest"
    kernels: tuple[Path, ...] = ()
    #: L1's own kernel: a bzImage with everything built in (apflab's host kernel
    #: build), booted without an initrd; None: the lab image's Debian kernel
    kernel: Path | None = None
    #: leave L1 running when this process exits (`apflab lab up`)
    detached: bool = False
    #: QEMU TCG threading for L1: "multi" (one host thread per vCPU) or "single"
    tcg_thread: str = "multi"
    #: "saved": restore L1 from a saved boot (apflab.vm.snapshot; the first lab of
    #: each L1 kernel, image and size makes it, in the machine cache); "cold": boot
    #: (a failed restore boots cold too).  The L2 experiment is the same either way:
    #: docs/performance.md, "Saved L1 boots"
    boot: str = "saved"
    #: the saved L1 boots; None: the machine's (:func:`saved_labs_dir`)
    saved_dir: Path | None = None

    @property
    def cpu_model(self) -> str:
        return "EPYC,+svm" if self.accel == "tcg" else "host"


def saved_labs_dir() -> Path:
    """Where this machine keeps its saved L1 boots (the machine cache)."""
    return paths.cache_dir() / "saved-labs"


class Lab:
    """The running L1.  See the module docstring."""

    def __init__(self, config: LabConfig, log_dir: Path, undo: UndoStack) -> None:
        self.config = config
        self.log_dir = log_dir
        self.undo = undo
        self.vm: Guest | None = None
        self._mark = 0
        self.timings: dict[str, float] = {}
        self.facts: dict[str, Any] = {}
        #: how L1 came up: "cold" (booted) or "restored" (from a saved boot)
        self.boot_mode = "cold"

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- bring-up ------------------------------------------------------------
    def up(self) -> None:
        self._mark = len(self.undo)
        t0 = time.monotonic()
        lab_img = ensure("lab")
        guest_img = ensure(self.config.guest_image)
        self.timings["images"] = time.monotonic() - t0
        root = paths.runtime_root()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        work = root / f"{self.undo.run_id}-lab"
        work.mkdir(mode=0o700)
        self.undo.push(RemoveTree(str(work)))
        t1 = time.monotonic()
        assets = build_assets(work / "assets", work / "assets.img", guest_img, self.config.kernels)
        shutil.rmtree(work / "assets")
        swap = work / "swap.img"
        with swap.open("wb") as f:
            f.truncate(self.config.swap_mb << 20)
        saved = saved_boots_disk()
        saved_boots = (
            ()
            if saved is None
            # writeback: L1's sync must reach the file (a torn saved boot would fail
            # every restore until it is dropped)
            else (Disk(saved, serial=SERIALS["saved_boots"], cache="writeback", idle=True),)
        )
        self.timings["assets"] = time.monotonic() - t1
        cfg = GuestConfig(
            boot=(
                BootSpec(self.config.kernel, None, lab_img.cmdline)
                if self.config.kernel is not None
                else lab_img.boot_spec()
            ),
            root=lab_img.disk,
            host_key=lab_img.host_key,
            name="L1",
            memory_mb=self.config.memory_mb,
            cpus=self.config.cpus,
            accel=self.config.accel
            if self.config.accel != "tcg"
            else f"tcg,thread={self.config.tcg_thread}",
            cpu=self.config.cpu_model,
            disks=(
                # L1 mounts, swaps on and hands out these only after boot (they
                # are idle at boot), so a saved L1 restores with this lab's files
                Disk(assets, readonly=True, serial=SERIALS["assets"], idle=True),
                Disk(guest_img.disk, readonly=True, serial=SERIALS["guest_root"]),
                Disk(swap, serial=SERIALS["swap"], cache="none", idle=True),
                *saved_boots,
            ),
            boot_timeout=self.config.boot_timeout,
            die_with_parent=not self.config.detached,
            console_fatal_after_boot=True,
            # no retry of L1's boot in here: the `lab` retry policy runs the whole
            # lab attempt again (apflab.retry), so L1 boots at most twice per run
            retry_boot=False,
            saved_boots=(self.config.saved_dir or saved_labs_dir())
            if self.config.boot == "saved"
            else None,
        )
        t2 = time.monotonic()
        self.vm = self._boot(cfg)
        self.timings["l1_boot"] = time.monotonic() - t2
        self.boot_mode = self.vm.boot_mode
        self._prepare_l1()
        log.info(
            "lab: L1 up (%s) in %.1fs (images %.1fs, assets %.1fs); %s",
            self.boot_mode,
            self.timings["l1_boot"],
            self.timings["images"],
            self.timings["assets"],
            self.facts.get("kvm", {}).get("reason", ""),
        )

    def _boot(self, cfg: GuestConfig) -> Guest:
        """Boot L1; a panicked or stuck boot is a :class:`LabError` (retried whole
        by the caller's ``lab`` policy)."""
        vm = Guest(cfg, self.log_dir, self.undo)
        try:
            vm.start()
        except (GuestPanic, BootTimeout) as err:
            vm.shutdown()
            raise LabError(f"L1 did not boot: {err}") from err
        except BaseException:
            vm.shutdown()
            raise
        return vm

    def _prepare_l1(self) -> None:
        vm = self.require_vm()
        mounted = vm.run(["findmnt", "-n", ASSETS_MOUNT], check=False)
        if not mounted.ok:
            vm.run(["mkdir", "-p", ASSETS_MOUNT])
            vm.run(["udevadm", "settle", "--timeout=30"], check=False)
            vm.run(
                ["mount", "-o", "ro", f"/dev/disk/by-id/virtio-{SERIALS['assets']}", ASSETS_MOUNT]
            )
        self._mount_saved_boots()
        # kvm_amd is in modules-load.d, but make sure before checking.
        vm.run(["modprobe", "kvm_amd"], check=False)
        # `apflab doctor --json` without the CLI's imports (~2.5 s of start-up in the
        # emulated L1); exit 1 means problems: listed in the facts, and judged below
        out = self.run([LAB_PYTHON, "-m", "apflab.host.doctor"], check=False).stdout
        facts = json.loads(out)
        self.facts = facts
        kvm = facts.get("kvm", {})
        if not kvm.get("usable"):
            raise LabError(f"L1 has no usable KVM: {kvm.get('reason', 'unknown')}")
        if kvm.get("async_pf_int") != 1:
            raise LabError(
                "L1's KVM lacks KVM_CAP_ASYNC_PF_INT (183): it cannot deliver async-PF "
                f"page-ready interrupts (kvm: {kvm})"
            )

    def _mount_saved_boots(self) -> None:
        """Mount the machine's saved-boots disk if this lab has it (a new file system
        when the old one does not mount: it is a cache)."""
        vm = self.require_vm()
        dev = f"/dev/disk/by-id/virtio-{SERIALS['saved_boots']}"
        if not vm.run(["test", "-b", dev], check=False).ok:
            return
        vm.run(["mkdir", "-p", SAVED_BOOTS_MOUNT])
        if vm.run(["mount", dev, SAVED_BOOTS_MOUNT], check=False).ok:
            return
        log.warning("lab: the saved-boots disk did not mount: making it anew (a cache)")
        vm.run(["mkfs.ext4", "-q", "-F", "-L", "apflab-saved", dev], timeout=300)
        vm.run(["mount", dev, SAVED_BOOTS_MOUNT])

    # -- use -----------------------------------------------------------------
    def require_vm(self) -> Guest:
        if self.vm is None:
            raise LabError("the lab is not up")
        return self.vm

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 3600.0,
        on_output: Callable[[str, str], None] | None = None,
    ) -> CmdResult:
        """Run ``argv`` in L1 with the lab environment (apflab on PATH)."""
        vm = self.require_vm()
        vm.check_alive()
        return run_in_lab(
            vm.ssh, argv, check=check, timeout=timeout, on_output=on_output, watch=vm.check_alive
        )

    def fetch(self, remote: str, local: Path) -> int:
        """Copy a directory tree from L1 to the host; return the file count."""
        return self.require_vm().ssh.get_tree(remote, local)

    @property
    def ssh(self) -> SSH:
        return self.require_vm().ssh

    def down(self) -> None:
        if self.vm is not None:
            self.vm.shutdown()
            self.vm = None
        self.undo.unwind_to(self._mark)


@dataclass(frozen=True)
class Shipped:
    """Where :func:`ship` put a run's files inside L1.

    :ivar files: the scenario's files (kernels, patches, fragments), by name
    :ivar kernel_cache: a kernel cache holding the kernels built on the host
    """

    files: str
    kernel_cache: str


def ship(
    ssh: SSH, where: str, files: Sequence[Path], built: Sequence[tuple[Path, Path]]
) -> Shipped:
    """Copy a run's files into L1 (SFTP), whether L1 was booted for the run or is an
    ``apflab lab up`` lab.

    :param files: the host files a scenario names, as ``<where>/files/NAME``
    :param built: ``(cache entry, request index)`` of kernels built on the host, as a
        kernel cache ``<where>/kcache`` (found there by :func:`apflab.kernel.lookup`)
    """
    out = Shipped(f"{where}/files", f"{where}/kcache")
    pairs = [(f, f"{out.files}/{f.name}") for f in files]
    for entry, index in built:
        pairs += [(p, f"{out.kernel_cache}/{entry.name}/{p.name}") for p in entry.iterdir()]
        pairs.append((index, f"{out.kernel_cache}/index/{index.name}"))
    ssh.put_files(pairs)
    return out


def run_in_lab(
    ssh: SSH,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 3600.0,
    on_output: Callable[[str, str], None] | None = None,
    watch: Callable[[], None] | None = None,
) -> CmdResult:
    """Run ``argv`` over an SSH connection to L1, with the lab environment."""
    env = [f"{k}={v}" for k, v in L1_ENV.items()]
    return ssh.run(
        ["env", *env, *argv], check=check, timeout=timeout, on_output=on_output, watch=watch
    )
