"""What one phase of a run hands the next: typed records, never dicts read back
with ``.get(key, default)`` (a misspelt key is a type error, not a default that
turns a run INVALID).

:class:`RunRecord` is the raw outcome of :func:`apflab.run.experiment.execute`
(written as run.json); :func:`apflab.run.judge.judge` turns it into the verdict.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.host import kvm
from apflab.run.pressure import PressureReport
from apflab.run.scenario import Scenario
from apflab.run.workload import WorkloadResult


@dataclass
class KernelFacts:
    """The guest kernel that ran: what was booted, and what it said it is.

    :ivar source: where it came from: ``{"kind": "image"|"file"}``, or for a kernel
        apflab built ``{kind, name, version, identity}`` of its source
    :ivar patches: ``{path, sha256}`` of each patch applied (a built kernel)
    :ivar config: ``{path, sha256}`` of each config layer (a built kernel)
    :ivar build: the cache key, how and when it was built (a built kernel)
    """

    path: str
    sha256: str
    cmdline: str
    release: str | None = None
    source: dict[str, str] = field(default_factory=dict)
    patches: list[dict[str, str]] = field(default_factory=list)
    config: list[dict[str, str]] = field(default_factory=list)
    build: dict[str, Any] | None = None


@dataclass(frozen=True)
class HostFacts:
    """The KVM host the guest ran on (this host, or L1 inside the lab)."""

    kernel: str
    hostname: str
    kvm: str
    kvm_module: str
    in_lab: bool
    cpus: int | None

    @classmethod
    def here(cls) -> HostFacts:
        info = kvm.probe()
        uname = os.uname()
        return cls(
            uname.release, uname.nodename, info.reason, info.module, paths.in_lab(), os.cpu_count()
        )


@dataclass(frozen=True)
class ApfFacts:
    """The guest's own word on async PF (its MSRs): on, with interrupt delivery?"""

    enabled: bool
    detail: str


@dataclass
class GuestFacts:
    """What was learned from and about the guest, phase by phase (None: not known)."""

    accel: str = ""
    boot_seconds: float | None = None
    #: "cold" (booted) or "restored" (from a saved boot: apflab.vm.snapshot)
    boot_mode: str = "cold"
    #: the saved boot restored: its key, cold boot_seconds, saved_at, memory_bytes
    saved_boot: dict[str, object] | None = None
    #: the kernel under test did not boot the image: its console line ("" if it did)
    boot_failure: str = ""
    #: ...and that line was a panic (the kernel's own fault)
    boot_panic: bool = False
    threads_in_cgroup: int = 0
    qemu_thp_enabled: bool | None = None
    async_pf: ApfFacts | None = None
    qmp_kvm_asyncpf_int: object = None
    hung_task_timeout_set: bool = False
    hyp_before: list[int] | None = None
    vmstat_before: dict[str, int] = field(default_factory=dict)
    hyp_after: list[int] | None = None
    vmstat_after: dict[str, int] = field(default_factory=dict)
    runstate_after: str | None = None
    #: why the guest could not be questioned after the workload ("" if it could)
    after_error: str = ""
    #: fatal kernel lines on the console after boot (panic, BUG, GP fault)
    console_faults: list[str] = field(default_factory=list)
    #: the guest stopped running during the run (a reset)
    reset: bool = False
    hung_tasks: list[str] = field(default_factory=list)


@dataclass
class TraceFacts:
    """The capture: where the trace went and what the tracer lost.

    :ivar lost: overrun + dropped events; None when the counters were not read
    """

    path: Path | None = None
    lost: int | None = None
    bytes: int = 0
    overrun: int = 0
    dropped: int = 0
    #: CPU seconds of the trace reader (the observer's own share of the machine)
    reader_cpu_s: float | None = None
    per_cpu: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = self.path.name if self.path else None  # beside run.json
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], results: Path) -> TraceFacts:
        fields = {**d, "path": results / d["path"] if d["path"] else None}
        return cls(**fields)


@dataclass
class RunRecord:
    """The raw outcome of the experiment, before judgement (run.json).

    :ivar vcpus: ``{cpu-index: host thread id}`` (QMP ``query-cpus-fast``)
    :ivar errors: infrastructure faults, one line each (the verdict is then ERROR)
    :ivar retries: per retry policy used, its attempts (:mod:`apflab.retry`)
    """

    run_id: str
    results: Path
    scenario: Scenario
    host: HostFacts
    kernel: KernelFacts | None = None
    guest: GuestFacts = field(default_factory=GuestFacts)
    vcpus: dict[int, int] = field(default_factory=dict)
    pressure: PressureReport = field(default_factory=PressureReport)
    workload: WorkloadResult | None = None
    trace: TraceFacts = field(default_factory=TraceFacts)
    errors: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    retries: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: when the experiment started (UTC, ISO 8601)
    started_at: str = field(default_factory=lambda: time.strftime(ISO_UTC, time.gmtime()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "started_at": self.started_at,
            "scenario": self.scenario.to_dict(),
            "kernel": asdict(self.kernel) if self.kernel else None,
            "host": asdict(self.host),
            "guest": asdict(self.guest),
            "vcpu_threads": {str(k): v for k, v in self.vcpus.items()},
            "pressure": self.pressure.to_dict(),
            "workload": self.workload.to_dict() if self.workload else None,
            "trace": self.trace.to_dict(),
            "errors": self.errors,
            "phases_s": self.phases,
            "retries": self.retries,
        }

    def write(self) -> Path:
        return write_json(self.results / RUN_FILE, self.to_dict())

    @classmethod
    def load(cls, results: Path) -> RunRecord:
        """The record of a results dir (run.json), e.g. one made inside the lab.

        :raises KeyError, TypeError: run.json is not one this version wrote
        """
        d = json.loads((results / RUN_FILE).read_text())
        guest = dict(d["guest"])
        if guest["async_pf"] is not None:
            guest["async_pf"] = ApfFacts(**guest["async_pf"])
        return cls(
            run_id=d["run_id"],
            results=results,
            scenario=Scenario.from_values(d["scenario"], check=False),
            host=HostFacts(**d["host"]),
            kernel=KernelFacts(**d["kernel"]) if d["kernel"] is not None else None,
            guest=GuestFacts(**guest),
            vcpus={int(k): int(v) for k, v in d["vcpu_threads"].items()},
            pressure=PressureReport.from_dict(d["pressure"]),
            workload=WorkloadResult.from_dict(d["workload"]) if d["workload"] else None,
            trace=TraceFacts.from_dict(d["trace"], results),
            errors=list(d["errors"]),
            phases=dict(d["phases_s"]),
            retries=dict(d["retries"]),
            started_at=d.get("started_at", ""),  # not in run.json before 2026-12-02
        )


def write_json(path: Path, doc: Any) -> Path:
    """Write a JSON document atomically (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        tmp.replace(path)
    except BaseException:  # a full disk, a signal: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return path


RUN_FILE = "run.json"
ISO_UTC = "%Y-%m-%dT%H:%M:%SZ"


# -- vcpus.json: {cpu-index: thread id}, beside the trace -------------------------
VCPUS_FILE = "vcpus.json"


def write_vcpus(results: Path, vcpus: dict[int, int]) -> Path:
    return write_json(results / VCPUS_FILE, {str(k): v for k, v in vcpus.items()})


def vcpu_of_pid(vcpus: dict[int, int]) -> dict[int, int]:
    """``{cpu-index: thread id}`` → ``{thread id: cpu-index}``, as the analysis reads it."""
    return {tid: idx for idx, tid in vcpus.items()}


def read_vcpus(path: Path) -> dict[int, int]:
    """A vcpus.json file → ``{cpu-index: thread id}``."""
    return {int(idx): int(tid) for idx, tid in json.loads(path.read_text()).items()}


#: a run's trace, in the order it is judged: the raw capture, else the text
TRACE_NAMES = ("trace.raw", "trace.txt.xz", "trace.txt")


def trace_of(results: Path) -> Path | None:
    """The trace a run left in its results (whole or partial), if any."""
    return next((p for p in (results / n for n in TRACE_NAMES) if p.exists()), None)
