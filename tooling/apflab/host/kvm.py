"""What kind of KVM this host has, and which accelerator a guest should use.

Decides between hardware KVM (stock guests run), PVM (``kvm_pvm``: /dev/kvm
exists but cannot run stock guests), nothing usable, and reports why, in one
line a person can act on.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

# <linux/kvm.h>: _IO(KVMIO=0xAE, nr)
KVM_GET_API_VERSION = 0xAE00
KVM_CHECK_EXTENSION = 0xAE03
KVM_API_VERSION = 12
KVM_CAP_ASYNC_PF = 59
KVM_CAP_ASYNC_PF_INT = 183


@dataclass(frozen=True)
class KvmInfo:
    """Facts about /dev/kvm on this host.

    :ivar flavour: ``hardware`` (kvm_intel/kvm_amd), ``pvm`` (kvm_pvm),
        ``none`` (no /dev/kvm or it cannot be opened), ``unknown``
    :ivar usable: stock guests can run under ``-accel kvm``
    :ivar reason: one line explaining ``usable``
    :ivar module: the vendor module found (kvm_intel, kvm_amd, kvm_pvm) or ""
    :ivar async_pf_int: KVM_CAP_ASYNC_PF_INT as reported by the kernel (0 if unknown)
    :ivar nested: the vendor module's ``nested`` parameter ("" if unknown)
    """

    flavour: str
    usable: bool
    reason: str
    module: str = ""
    async_pf_int: int = 0
    nested: str = ""

    @property
    def accel(self) -> str:
        """The QEMU accelerator a stock guest should use here."""
        return "kvm" if self.usable else "tcg"


def _module_loaded(sysfs: Path, name: str) -> bool:
    return (sysfs / "module" / name).is_dir()


def probe(dev: Path = Path("/dev/kvm"), sysfs: Path = Path("/sys")) -> KvmInfo:
    """Inspect /dev/kvm and the loaded KVM modules."""
    if _module_loaded(sysfs, "kvm_pvm"):
        return KvmInfo(
            "pvm",
            False,
            "/dev/kvm is PVM (module kvm_pvm), which cannot run stock guests",
            module="kvm_pvm",
        )
    if not dev.exists():
        return KvmInfo("none", False, f"{dev} does not exist (no KVM module loaded)")
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return KvmInfo("none", False, f"{dev} cannot be opened: {err.strerror}")
    try:
        api = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        apf_int = fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_ASYNC_PF_INT)
    except OSError as err:
        return KvmInfo("unknown", False, f"{dev} does not answer KVM ioctls: {err.strerror}")
    finally:
        os.close(fd)
    if api != KVM_API_VERSION:
        return KvmInfo("unknown", False, f"{dev} reports KVM API {api}, expected {KVM_API_VERSION}")
    for module in ("kvm_intel", "kvm_amd"):
        if _module_loaded(sysfs, module):
            nested_file = sysfs / "module" / module / "parameters" / "nested"
            nested = nested_file.read_text().strip() if nested_file.exists() else ""
            return KvmInfo("hardware", True, f"hardware KVM ({module})", module, apf_int, nested)
    return KvmInfo("unknown", False, f"{dev} works but no kvm_intel/kvm_amd module is loaded")
