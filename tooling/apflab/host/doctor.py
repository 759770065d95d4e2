"""What this host offers, and which execution path apflab takes here (``apflab doctor``)."""

from __future__ import annotations

import os
import shutil
from typing import Any

from apflab import __version__, paths
from apflab.errors import PreflightError
from apflab.host import cgroup, kvm, tracefs

TOOLS = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs", "setpriv", "gcc")


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
    except PreflightError as err:
        facts["cgroup"] = {"error": str(err)}
    facts["tracefs"] = next(
        (str(p) for p in tracefs.TRACEFS_CANDIDATES if (p / "instances").is_dir()), None
    )
    facts["tools"] = {t: shutil.which(t) is not None for t in TOOLS}
    return facts
