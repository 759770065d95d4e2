"""One async-PF latency experiment, end to end, on a KVM host.

This is the direct path: it runs on a bare-metal KVM host, and unchanged
inside the nested lab's L1.  (:mod:`apflab.runner` decides where to run it.)

    Scenario → pre-flight → swap + cgroup → guest (paused, moved in, booted)
      → trace on → limit on → workload under a deadline → counters
      → trace saved (before the guest stops) → guest stopped → analysis
      → verdict.json + report.html in results/<run-id>/

Every phase is timed; every host change is on the run's undo stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import lzma
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from apflab import guestinfo, images, paths
from apflab.errors import ApflabError, PreflightError, UsageError, VMError
from apflab.host import kvm, tracefs
from apflab.pressure import Pressure, PressureSpec, check_sizes, preflight
from apflab.undo import RemoveTree, UndoStack
from apflab.vm.qemu import BootSpec, Guest, GuestConfig, console_faults
from apflab.workload import WorkloadResult, WorkloadSpec, run_workload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    """Everything that defines one run (all of it recorded in run.json).

    Defaults are calibrated on the nested lab (2-core host, TCG L1, KVM L2):
    see docs/calibration.md for the measurements behind them.
    """

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    image: str = "guest"
    guest_memory_mb: int = 1024
    guest_cpus: int | None = None  # None: paths.default_guest_cpus()
    accel: str | None = None
    pressure: PressureSpec = field(default_factory=PressureSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    deadline_s: float = 300.0
    trace_buffer_kb: int = 8192
    trace: bool = True

    def validate(self) -> None:
        self.workload.validate()
        if self.kernel is not None and not self.kernel.is_file():
            raise UsageError(f"kernel {self.kernel} does not exist: pass a bzImage path")
        if self.initrd is not None and not self.initrd.is_file():
            raise UsageError(f"initrd {self.initrd} does not exist")
        if self.deadline_s <= 0:
            raise UsageError("the workload deadline must be > 0 seconds")
        check_sizes(self.pressure, self.workload.total_mb, self.guest_memory_mb)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kernel"] = str(self.kernel) if self.kernel else None
        d["initrd"] = str(self.initrd) if self.initrd else None
        return d


class Phases:
    """Names each phase with its elapsed time, as it happens."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.t0 = time.monotonic()
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        self.emit(f"[{start - self.t0:7.1f}s] {name} ...")
        try:
            yield
        finally:
            took = time.monotonic() - start
            self.times[name] = round(took, 1)
            self.emit(f"[{time.monotonic() - self.t0:7.1f}s] {name} done in {took:.1f}s")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def compress(src: Path, dest: Path) -> None:
    with src.open("rb") as fin, lzma.open(dest, "wb", preset=1) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


@dataclass
class RunRecord:
    """The raw outcome of the experiment, before judgement."""

    run_id: str
    results: Path
    scenario: Scenario
    kernel: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    guest: dict[str, Any] = field(default_factory=dict)
    vcpus: dict[int, int] = field(default_factory=dict)
    pressure: dict[str, Any] = field(default_factory=dict)
    workload: WorkloadResult | None = None
    trace_path: Path | None = None
    trace_lost: int | None = None
    trace_stats: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "scenario": self.scenario.to_dict(),
            "kernel": self.kernel,
            "host": self.host,
            "guest": self.guest,
            "vcpu_threads": {str(k): v for k, v in self.vcpus.items()},
            "pressure": self.pressure,
            "workload": self.workload.to_dict() if self.workload else None,
            "trace": {
                "path": str(self.trace_path) if self.trace_path else None,
                "lost": self.trace_lost,
                **self.trace_stats,
            },
            "errors": self.errors,
            "phases_s": self.phases,
        }


def host_description() -> dict[str, Any]:
    info = kvm.probe()
    return {
        "kernel": os.uname().release,
        "hostname": os.uname().nodename,
        "kvm": info.reason,
        "kvm_module": info.module,
        "in_lab": paths.in_lab(),
        "cpus": os.cpu_count(),
    }


def _thp_enabled(pid: int) -> bool | None:
    """The ``THP_enabled`` flag of a process (0 after PR_SET_THP_DISABLE)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("THP_enabled:"):
                return line.split()[1] == "1"
    except OSError:
        pass
    return None


def execute(
    scenario: Scenario, results: Path, run_id: str, emit: Callable[[str], None]
) -> RunRecord:
    """Run the experiment and write the raw evidence under ``results``.

    Infrastructure faults during the run are recorded in ``errors`` (verdict
    ERROR later) rather than raised, once the results dir exists: a run always
    leaves its evidence behind.  Bad input and pre-flight failures raise
    before anything changes.
    """
    scenario.validate()
    info = kvm.probe()
    if scenario.accel != "tcg" and not info.usable:
        raise PreflightError(
            f"no usable KVM here ({info.reason}): run through the lab (`apflab run` picks it) "
            "or pass --accel tcg for a pressure-only run"
        )
    cginfo = preflight(scenario.pressure, scenario.workload.total_mb, scenario.guest_memory_mb)
    img = images.ensure(scenario.image)
    boot = img.boot_spec(scenario.cmdline)
    if scenario.kernel is not None:
        boot = BootSpec(scenario.kernel, scenario.initrd or img.initrd, boot.cmdline)

    results.mkdir(parents=True, exist_ok=True)
    logs = results / "logs"
    logs.mkdir(exist_ok=True)
    rec = RunRecord(run_id, results, scenario)
    rec.host = host_description()
    rec.kernel = {
        "path": str(boot.kernel),
        "sha256": sha256_file(boot.kernel),
        "cmdline": boot.cmdline,
        "release": None,
    }
    phases = Phases(emit)
    cfg = GuestConfig(
        boot=boot,
        root=img.disk,
        host_key=img.host_key,
        name="guest",
        memory_mb=scenario.guest_memory_mb,
        cpus=scenario.guest_cpus or paths.default_guest_cpus(),
        accel=scenario.accel,
        thp=scenario.pressure.thp_for(cginfo.version),
    )
    try:
        with UndoStack(run_id) as undo:
            pressure = Pressure(scenario.pressure, cginfo, undo)
            _Experiment(scenario, cfg, pressure, undo, rec, emit).run(phases)
    except (UsageError, PreflightError):
        raise
    except ApflabError as err:
        log.error("run %s: %s", run_id, err)
        rec.errors.append(str(err))
    rec.phases = phases.times
    (results / "run.json").write_text(json.dumps(rec.to_dict(), indent=1, default=str) + "\n")
    return rec


class _Experiment:
    """The phases of one run, in order; each leaves its evidence in ``rec``."""

    def __init__(
        self,
        scenario: Scenario,
        cfg: GuestConfig,
        pressure: Pressure,
        undo: UndoStack,
        rec: RunRecord,
        emit: Callable[[str], None],
    ) -> None:
        self.scenario, self.cfg, self.pressure, self.undo = scenario, cfg, pressure, undo
        self.rec, self.emit = rec, emit
        self.trace_txt = paths.runtime_root() / f"{rec.run_id}-trace.txt"
        self.session: tracefs.TraceSession | None = None
        self.vm: Guest | None = None

    def run(self, phases: Phases) -> None:
        with phases.phase("pressure setup (swap, cgroup)"):
            self.pressure.setup()
        with phases.phase("guest boot"):
            vm = self.boot()
        with phases.phase("guest checks"):
            self.checks(vm)
        if self.scenario.trace and vm.accel == "kvm":
            with phases.phase("trace start"):
                self.start_trace()
        with phases.phase("memory limit"):
            self.squeeze()
        with phases.phase("workload"):
            wl = run_workload(vm, self.scenario.workload, self.scenario.deadline_s)
            self.rec.workload = wl
            state = "completed" if wl.completed else wl.error
            self.emit(f"          workload: {state} in {wl.seconds:.1f}s, {len(wl.rounds)} rounds")
        with phases.phase("evidence"):
            self.evidence(vm)
        if self.session is not None:
            with phases.phase("trace save"):
                self.save_trace(self.session)
        with phases.phase("guest stop"):
            vm.shutdown()

    def boot(self) -> Guest:
        rec = self.rec

        def move_into_cgroup(g: Guest) -> None:
            rec.guest["threads_in_cgroup"] = len(self.pressure.attach(g.pid))
            rec.guest["qemu_thp_enabled"] = _thp_enabled(g.pid)

        vm = Guest(self.cfg, rec.results / "logs", self.undo, before_start=move_into_cgroup)
        vm.start()  # on any error below, the undo stack kills QEMU (after the trace stops)
        rec.guest["boot_failures"] = vm.boot_failures
        rec.guest["boot_seconds"] = round(vm.boot_seconds or 0, 1)
        rec.guest["accel"] = vm.accel
        rec.kernel["release"] = vm.run(["uname", "-r"]).stdout.strip()
        rec.vcpus = vm.vcpu_threads()
        return vm

    def checks(self, vm: Guest) -> None:
        rec = self.rec
        if vm.accel == "kvm":
            apf = guestinfo.apf_msrs(vm)
            rec.guest["async_pf"] = {
                "enabled": apf.enabled and apf.interrupt_delivery,
                "detail": apf.describe(),
            }
            rec.guest["qmp_kvm_asyncpf_int"] = vm.qmp.cmd(
                "qom-get", path="/machine/unattached/device[0]", property="kvm-asyncpf-int"
            )
        # report hung tasks after 30 s instead of 120 s: a stalled guest shows it sooner
        rec.guest["hung_task_timeout_set"] = vm.run(
            ["sysctl", "-q", "-w", "kernel.hung_task_timeout_secs=30"], check=False
        ).ok
        rec.guest["hyp_before"] = guestinfo.hyp_interrupts(
            vm, rec.results / "guest" / "interrupts.before"
        )
        rec.guest["vmstat_before"] = _guest_vmstat(vm)

    def start_trace(self) -> None:
        self.session = tracefs.TraceSession(
            f"apflab-{self.rec.run_id}",
            self.trace_txt,
            self.undo,
            buffer_kb=self.scenario.trace_buffer_kb,
        )
        self.undo.push(RemoveTree(str(self.trace_txt)))
        self.session.start()
        (self.rec.results / "trace-formats.txt").write_text(self.session.formats())

    def squeeze(self) -> None:
        self.pressure.report.before = self.pressure.snapshot()
        self.pressure.save_raw(self.rec.results / "host", "before")
        self.rec.pressure["reclaim_seconds"] = round(self.pressure.apply(), 1)

    def evidence(self, vm: Guest) -> None:
        self.pressure.report.after = self.pressure.snapshot()
        self.pressure.save_raw(self.rec.results / "host", "after")
        self.rec.pressure.update(self.pressure.finish().to_dict())
        if not vm.is_running():
            oom = self.rec.pressure["memory_events"].get("oom_kill", 0)
            why = (
                f": the memory cgroup's OOM killer fired {oom} time(s) (raise --limit)"
                if oom
                else ""
            )
            raise VMError(f"the guest's QEMU died during the workload{why}")
        _guest_after(vm, self.rec)
        with (self.rec.results / "workload.jsonl").open("w") as f:
            for r in self.rec.workload.rounds if self.rec.workload else []:
                f.write(json.dumps(r) + "\n")

    def save_trace(self, session: tracefs.TraceSession) -> None:
        rec = self.rec
        stats = session.stop()
        rec.trace_lost = stats.lost
        rec.trace_stats = {
            "bytes": stats.bytes_written,
            "overrun": stats.overrun,
            "dropped": stats.dropped,
            "per_cpu": {str(k): v for k, v in stats.per_cpu.items()},
        }
        dest = rec.results / "trace.txt.xz"
        compress(self.trace_txt, dest)
        rec.trace_path = dest
        (rec.results / "vcpus.json").write_text(
            json.dumps({str(k): v for k, v in rec.vcpus.items()}) + "\n"
        )


def _guest_vmstat(vm: Guest) -> dict[str, int]:
    from apflab.host.cgroup import parse_flat_keyed  # noqa: PLC0415

    text = vm.run(["cat", "/proc/vmstat"], timeout=30).stdout
    stat = parse_flat_keyed(text)
    return {k: stat.get(k, 0) for k in ("pgfault", "pgmajfault", "pswpin", "pswpout")}


def _guest_after(vm: Guest, rec: RunRecord) -> None:
    """Guest-side evidence after the workload; a stalled guest may not answer."""
    state = vm.runstate()
    rec.guest["runstate_after"] = state
    if state != "running":
        # e.g. a triple fault (reset) during the workload: the CPU state before
        # the reset is in logs/guest-cpu-reset.log (QEMU -d cpu_reset)
        rec.guest["after_error"] = f"the guest stopped running during the workload ({state})"
        log.warning("%s", rec.guest["after_error"])
    try:
        if state != "running":
            raise VMError(rec.guest["after_error"])
        rec.guest["hyp_after"] = guestinfo.hyp_interrupts(
            vm, rec.results / "guest" / "interrupts.after"
        )
        rec.guest["vmstat_after"] = _guest_vmstat(vm)
        dmesg = vm.run(["dmesg"], check=False, timeout=30).stdout
        (rec.results / "logs" / "guest-dmesg.txt").write_text(dmesg)
        rec.guest["hung_tasks"] = guestinfo.parse_hung_tasks(dmesg)
    except ApflabError as err:
        rec.guest["after_error"] = f"guest did not answer after the workload: {err}"
        log.warning("%s", rec.guest["after_error"])
    rec.guest["console_faults"] = console_faults(vm.console_log)
    rec.guest["reset"] = state != "running"
    # the console log sees hung-task reports even when SSH no longer works
    console = vm.console_log.read_text(errors="replace") if vm.console_log.exists() else ""
    from_console = guestinfo.parse_hung_tasks(console)
    known = set(rec.guest.get("hung_tasks", []))
    rec.guest["hung_tasks"] = sorted(known | set(from_console))


def with_scenario(base: Scenario, **changes: Any) -> Scenario:
    return replace(base, **changes)
