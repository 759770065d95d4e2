"""``apflab boot``: boot one guest, drive it over QMP and SSH, report what it found.

No pressure, no trace, no verdict: a quick check that a kernel and image boot
here (and, under KVM, that async PF with interrupt delivery is on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.errors import UsageError
from apflab.host import procfs
from apflab.images.build import ensure
from apflab.undo import UndoStack
from apflab.vm import guestinfo
from apflab.vm.qemu import BootSpec, Guest, GuestConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootRequest:
    """What to boot: the image's kernel unless ``kernel`` is given."""

    image: str = "guest"
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    memory_mb: int = 1024
    cpus: int | None = None
    accel: str | None = None
    log_dir: Path | None = None


def boot(request: BootRequest, hold: Callable[[Guest], None] | None = None) -> dict[str, Any]:
    """Boot, collect the report, shut down (``hold`` runs while the guest is up)."""
    avail = procfs.mem_available_mb()
    if request.memory_mb > avail:
        raise UsageError(
            f"--memory {request.memory_mb} MB does not fit in this host's {avail} MB "
            "available: lower it"
        )
    img = ensure(request.image)
    spec = img.boot_spec(request.cmdline)
    if request.kernel is not None:
        spec = BootSpec(request.kernel, request.initrd or img.initrd, spec.cmdline)
    run_id = paths.new_run_id("boot")
    log_dir = (request.log_dir or Path("results") / run_id).resolve()
    cfg = GuestConfig(
        boot=spec,
        root=img.disk,
        host_key=img.host_key,
        name="guest",
        memory_mb=request.memory_mb,
        cpus=request.cpus or paths.default_guest_cpus(),
        accel=request.accel,
    )
    report: dict[str, Any] = {"image": str(img.directory), "log_dir": str(log_dir)}
    log.info("boot run %s: logs in %s", run_id, log_dir)
    t0 = time.monotonic()
    with UndoStack(run_id) as undo, Guest(cfg, log_dir, undo) as vm:
        report.update(_facts(vm))
        if hold is not None:
            hold(vm)
    report["total_seconds"] = round(time.monotonic() - t0, 1)
    return report


def _facts(vm: Guest) -> dict[str, Any]:
    threads = vm.vcpu_threads()
    facts: dict[str, Any] = {
        "accel": vm.accel,
        "accel_reason": vm.accel_reason,
        "boot_seconds": round(vm.boot_seconds or 0.0, 1),
        "qmp_status": vm.qmp.cmd("query-status"),
        "kernel": vm.run(["uname", "-r"]).stdout.strip(),
        "ssh": "ok",
        "vcpu_threads": {str(k): v for k, v in threads.items()},
        "vcpu_threads_in_qemu": all(
            Path(f"/proc/{vm.pid}/task/{tid}").exists() for tid in threads.values()
        ),
    }
    if vm.accel == "kvm":
        apf = guestinfo.apf_msrs(vm)
        facts["async_pf"] = {
            "enabled": apf.enabled,
            "interrupt": apf.interrupt_delivery,
            "detail": apf.describe(),
            # QEMU's view: the CPUID bit that lets the guest enable interrupt delivery
            "qmp_kvm_asyncpf_int": vm.qmp.cmd(
                "qom-get", path="/machine/unattached/device[0]", property="kvm-asyncpf-int"
            ),
        }
    return facts


def hold_until_interrupted(vm: Guest) -> None:
    """Keep the guest up until Ctrl-C (or SIGTERM), checking it is alive."""
    while True:
        time.sleep(1)
        vm.check_alive()
