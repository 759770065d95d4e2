"""What this host offers, and which execution path apflab takes here (``apflab doctor``)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apflab import __version__, paths
from apflab.errors import PreflightError
from apflab.host import cgroup, kvm, procfs, tracefs

#: what a run needs where its guest runs (also inside the lab's L1)
RUN_TOOLS = ("qemu-system-x86_64", "qemu-img", "setpriv")
#: what builds images and guest kernels (never inside L1: they come from the host)
BUILD_TOOLS = ("mmdebstrap", "mke2fs", "gcc", "make", "bc", "flex", "bison", "patch", "ccache")
#: free space needed: the caches (images ~2.5 GiB, a kernel source ~1.7 GiB, base
#: trees) and the runtime root (a 2 GiB swap file, the trace)
MIN_FREE_GB = {"cache": 8, "runtime": 3}
#: inside the lab's L1: swap is a disk of its own (no swap file), saved boots too;
#: the runtime root keeps the guest's overlay and the trace (tens of MB)
MIN_FREE_GB_IN_LAB = {"runtime": 1}
#: L1's memory by default, plus room for this host itself
LAB_MEMORY_MB = 3072 + 1024


def host_facts() -> dict[str, Any]:
    """KVM flavour and path (direct or lab), cgroup, tracefs, tools — as plain data
    (the lab reads it from ``apflab doctor --json`` inside L1)."""
    info = kvm.probe()
    facts: dict[str, Any] = {
        "apflab": __version__,
        "root": os.geteuid() == 0,
        "kernel": os.uname().release,
        "in_lab": paths.in_lab(),
        "kvm": {
            "flavour": info.flavour,
            "usable": info.usable,
            "reason": info.reason,
            "module": info.module,
            "async_pf_int": info.async_pf_int,
            "nested": info.nested,
        },
    }
    if info.usable:
        facts["path"] = "direct"
        facts["path_reason"] = f"{info.reason}: guests run here under KVM"
    else:
        facts["path"] = "lab"
        facts["path_reason"] = (
            f"{info.reason}; real KVM comes from the nested lab "
            "(L1 under TCG with -cpu EPYC,+svm running kvm_amd)"
        )
    try:
        cg = cgroup.detect()
        facts["cgroup"] = {"version": cg.version, "parent": str(cg.parent)}
        if cg.version == 2:
            subtree = cg.parent / "cgroup.subtree_control"
            enabled = subtree.read_text().split() if subtree.exists() else []
            facts["cgroup"]["memory_for_children"] = "memory" in enabled
    except PreflightError as err:
        facts["cgroup"] = {"error": str(err)}
    facts["tracefs"] = next(
        (str(p) for p in tracefs.TRACEFS_CANDIDATES if (p / "instances").is_dir()), None
    )
    facts["kvm_events"] = any(
        (p / "events" / "kvm" / "kvm_async_pf_ready").is_dir() for p in tracefs.TRACEFS_CANDIDATES
    )
    tools = RUN_TOOLS if paths.in_lab() else (*RUN_TOOLS, *BUILD_TOOLS)
    facts["tools"] = {t: shutil.which(t) is not None for t in tools}
    facts["mem_available_mb"] = procfs.mem_available_mb()
    where = {"runtime": paths.runtime_root()}
    if not paths.in_lab():  # L1's cache is the read-only assets disk
        where["cache"] = paths.cache_dir()
    facts["disk_free_gb"] = {
        what: {"path": str(p), "free": shutil.disk_usage(_existing(p)).free >> 30}
        for what, p in where.items()
    }
    return facts


#: what a run needs on this host besides its guest's tools: swap where the guest runs
#: (direct), the saved-boots disk probe where the lab runs
DIRECT_TOOLS = (*RUN_TOOLS, "mkswap", "swapon", "swapoff")
LAB_TOOLS = (*RUN_TOOLS, "qemu-io")


def preflight(direct: bool) -> None:
    """Before a run changes anything here: the tools it calls, room in the runtime root,
    and (when its guest runs here) a memory cgroup controller.

    :raises PreflightError: one line: the first problem and its fix
    """
    found: list[Problem] = []
    missing = [t for t in (DIRECT_TOOLS if direct else LAB_TOOLS) if shutil.which(t) is None]
    if missing:
        found.append(Problem(f"missing tools: {', '.join(missing)}", "make deps"))
    runtime = paths.runtime_root()
    free = shutil.disk_usage(_existing(runtime)).free >> 30
    if disk := _disk_problem("runtime", runtime, free, paths.in_lab()):
        found.append(disk)
    if direct:
        try:
            cgroup.check_children(cgroup.detect())
        except PreflightError as err:  # its message ends with its fix
            found.append(Problem(str(err), ""))
    if found:
        more = f" (and {len(found) - 1} more: apflab doctor)" if len(found) > 1 else ""
        first = found[0]
        raise PreflightError(f"{first.what}: {first.fix}{more}" if first.fix else first.what + more)


def _disk_problem(what: str, path: Path | str, free_gb: int, in_lab: bool) -> Problem | None:
    """Too little free space under ``path`` for ``what`` (the cache, the runtime root)
    on a host inside the lab (``in_lab``) or not."""
    need = (MIN_FREE_GB_IN_LAB if in_lab else MIN_FREE_GB)[what]
    if free_gb >= need:
        return None
    return Problem(f"only {free_gb} GiB free under {path}", f"free {need} GiB")


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


@dataclass(frozen=True)
class Problem:
    """Something that makes a run fail here, and what to do about it."""

    what: str
    fix: str


def problems(facts: dict[str, Any]) -> list[Problem]:
    """Everything in ``facts`` (:func:`host_facts`) that stops a run on this host."""
    out: list[Problem] = []
    if not facts["root"]:
        out.append(Problem("not root", "run as root (cgroups, swap, tracefs, image builds)"))
    missing = [t for t, ok in facts["tools"].items() if not ok]
    if missing:
        out.append(Problem(f"missing tools: {', '.join(missing)}", "make deps"))
    for what, disk in facts["disk_free_gb"].items():
        if problem := _disk_problem(what, disk["path"], disk["free"], bool(facts.get("in_lab"))):
            out.append(problem)
    if facts["path"] == "lab":
        if facts["mem_available_mb"] < LAB_MEMORY_MB:
            out.append(
                Problem(
                    f"{facts['mem_available_mb']} MiB available; the lab needs {LAB_MEMORY_MB}",
                    "free memory, or pass a smaller --lab-memory",
                )
            )
        return out
    out += _direct_problems(facts)
    return out


def _direct_problems(facts: dict[str, Any]) -> list[Problem]:
    """What a guest under KVM right here needs (the lab's L1 brings its own)."""
    out = []
    if facts["kvm"]["async_pf_int"] != 1:
        out.append(
            Problem(
                "KVM here lacks KVM_CAP_ASYNC_PF_INT (interrupt-based page-ready delivery)",
                "a host kernel >= 5.8 with kvm_intel or kvm_amd",
            )
        )
    cg = facts["cgroup"]
    if "error" in cg:
        out.append(Problem(cg["error"], "boot with cgroup_enable=memory, or mount cgroup2"))
    elif not cg.get("memory_for_children", True):
        out.append(
            Problem(
                f"the memory controller is not enabled for children of {cg['parent']}",
                f"echo +memory > {cg['parent']}/cgroup.subtree_control",
            )
        )
    if not facts["kvm_events"]:
        out.append(
            Problem(
                "tracefs has no kvm async-PF events (kvm_async_pf_ready)",
                "modprobe kvm, and mount tracefs on /sys/kernel/tracing",
            )
        )
    return out


def report() -> dict[str, Any]:
    """The facts and their problems as one document (``apflab doctor --json``)."""
    facts = host_facts()
    return {**facts, "problems": [asdict(p) for p in problems(facts)]}


if __name__ == "__main__":
    # ``python -m apflab.host.doctor``: the JSON report without the CLI's imports (the
    # lab's check at lab up, where Python's start-up in the emulated L1 costs seconds)
    doc = report()
    print(json.dumps(doc, indent=1))
    sys.exit(1 if doc["problems"] else 0)
