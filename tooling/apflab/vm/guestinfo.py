"""Facts read from inside a guest over SSH, with their parsers kept pure.

* :func:`parse_interrupts` — the HYP line of /proc/interrupts (vector 0xf3,
  the async-PF "page ready" interrupt), per CPU.
* :func:`parse_hung_tasks` — "task ... blocked for more than N seconds".
* :func:`apf_msrs` — MSR_KVM_ASYNC_PF_EN / _INT read through /dev/cpu/N/msr:
  the guest's own word on whether async PF with interrupt delivery is on.
* :func:`vmstat` — the guest's own fault and swap counters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from apflab.host.procfs import parse_flat_keyed
from apflab.process import Runner

MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_ASYNC_PF_INT = 0x4B564D06
MSR_KVM_ASYNC_PF_ACK = 0x4B564D07
KVM_ASYNC_PF_ENABLED = 1 << 0
KVM_ASYNC_PF_SEND_ALWAYS = 1 << 1
KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT = 1 << 2
KVM_ASYNC_PF_DELIVERY_AS_INT = 1 << 3


def parse_interrupts(text: str, label: str = "HYP") -> list[int]:
    """Per-CPU counts of one /proc/interrupts line (``HYP`` by default)."""
    lines = text.splitlines()
    if not lines:
        return []
    ncpu = len(lines[0].split())
    for line in lines[1:]:
        name, sep, rest = line.partition(":")
        if sep and name.strip() == label:
            fields = rest.split()
            return [int(x) for x in fields[:ncpu] if x.isdigit()]
    return []


_HUNG = re.compile(r"task (?P<comm>.+?):(?P<pid>\d+) blocked for more than (?P<secs>\d+) seconds")


def parse_hung_tasks(dmesg: str) -> list[str]:
    """The hung-task reports in a kernel log, one line each."""
    return [m.group(0) for m in _HUNG.finditer(dmesg)]


@dataclass(frozen=True)
class ApfState:
    """The guest's async-PF MSRs (per vCPU 0; the guest sets all vCPUs alike)."""

    en: int
    vector: int

    @property
    def enabled(self) -> bool:
        return bool(self.en & KVM_ASYNC_PF_ENABLED)

    @property
    def interrupt_delivery(self) -> bool:
        return bool(self.en & KVM_ASYNC_PF_DELIVERY_AS_INT)

    def describe(self) -> str:
        return (
            f"MSR_KVM_ASYNC_PF_EN={self.en:#x} (enabled={self.enabled}, "
            f"delivery-as-interrupt={self.interrupt_delivery}), "
            f"MSR_KVM_ASYNC_PF_INT vector={self.vector:#x}"
        )


def parse_od_u64(text: str) -> int:
    """Parse ``od -An -tx8`` output of one 8-byte value."""
    words = text.split()
    if len(words) != 1:
        raise ValueError(f"expected one 64-bit hex word from od, got {text!r}")
    return int(words[0], 16)


def read_msr(vm: Runner, msr: int, cpu: int = 0) -> int:
    """Read one MSR in the guest through the msr driver (dd seeks, od formats)."""
    tmp = f"/run/apflab-msr-{msr:x}"
    # a module in Debian's kernel, built in (and no modules at all) in apflab's own
    vm.run(["modprobe", "msr"], check=False)
    vm.run(
        [
            "dd",
            f"if=/dev/cpu/{cpu}/msr",
            f"of={tmp}",
            "bs=8",
            "count=1",
            f"skip={msr}",
            "iflag=skip_bytes",
            "status=none",
        ]
    )
    out = vm.run(["od", "-An", "-tx8", tmp]).stdout
    vm.run(["rm", "-f", tmp])
    return parse_od_u64(out)


def apf_msrs(vm: Runner) -> ApfState:
    return ApfState(read_msr(vm, MSR_KVM_ASYNC_PF_EN), read_msr(vm, MSR_KVM_ASYNC_PF_INT) & 0xFF)


def hyp_interrupts(vm: Runner, save: Path | None = None) -> list[int]:
    """Per-CPU HYP counts; the raw /proc/interrupts text is kept in ``save``."""
    text = vm.run(["cat", "/proc/interrupts"]).stdout
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(text)
    return parse_interrupts(text)


#: the guest's /proc/vmstat counters kept as evidence
GUEST_VMSTAT_KEYS = ("pgfault", "pgmajfault", "pswpin", "pswpout")


def vmstat(vm: Runner) -> dict[str, int]:
    """The guest's fault and swap counters (:data:`GUEST_VMSTAT_KEYS`)."""
    stat = parse_flat_keyed(vm.run(["cat", "/proc/vmstat"], timeout=30).stdout)
    return {k: stat.get(k, 0) for k in GUEST_VMSTAT_KEYS}
