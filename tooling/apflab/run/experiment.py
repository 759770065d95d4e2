"""One async-PF latency experiment, end to end, on a KVM host.

This is the direct path: it runs on a bare-metal KVM host, and unchanged
inside the nested lab's L1 (:mod:`apflab.run.dispatch` decides where).

    Scenario → pre-flight → swap + cgroup → guest (paused, moved in, booted)
      → trace on → limit on → workload under a deadline → counters
      → trace saved (before the guest stops) → guest stopped
      = RunRecord (raw evidence, run.json) → judged by apflab.run.judge

Every phase is timed; every host change is on the run's undo stack.
"""

from __future__ import annotations

import contextlib
import json
import logging
import lzma
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.analysis import verdict
from apflab.analysis.guest import WORKLOAD_START
from apflab.errors import (
    ApflabError,
    GuestBootFailed,
    GuestPanic,
    HostError,
    PreflightError,
    UsageError,
    VMError,
    is_disk_full,
)
from apflab.host import kvm, tracefs
from apflab.images.build import ensure
from apflab.run import guest_kernel
from apflab.run.phases import Emit, Phases
from apflab.run.pressure import SAVED_PAGE_CACHE, Pressure, page_cache_credit, preflight
from apflab.run.records import (
    ApfFacts,
    GuestFacts,
    HostFacts,
    RunRecord,
    trace_of,
    vcpu_of_pid,
    write_json,
    write_vcpus,
)
from apflab.run.scenario import Scenario
from apflab.run.stall import StallWatch
from apflab.run.workload import run_workload
from apflab.undo import UndoStack
from apflab.vm import guestinfo, snapshot
from apflab.vm.console import console_faults
from apflab.vm.qemu import Guest, GuestConfig

log = logging.getLogger(__name__)

#: the trace as it streams; compressed to trace.txt.xz when the trace is saved
PARTIAL_TRACE = "trace.txt"
#: a raw capture (``--trace on``/``record``: :mod:`apflab.analysis.ringbuf`), kept as is
RAW_TRACE = "trace.raw"


def compress(src: Path, dest: Path) -> None:
    with src.open("rb") as fin, lzma.open(dest, "wb", preset=1) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _thp_enabled(pid: int) -> bool | None:
    """The ``THP_enabled`` flag of a process (0 after PR_SET_THP_DISABLE)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("THP_enabled:"):
                return line.split()[1] == "1"
    except OSError:
        pass
    return None


def _saved_boots(scenario: Scenario, emit: Emit) -> Path | None:
    """Where this run's saved boots are, or None: a cold boot (``--boot cold``, or a
    lab without its saved-boots disk, whose L1 root has no room for them)."""
    if scenario.boot != "saved":
        return None
    store = snapshot.store_dir()
    if paths.in_lab() and not os.path.ismount(store):
        emit(f"          guest: {store} is not mounted in this lab: booting cold")
        return None
    return store


def execute(scenario: Scenario, results: Path, run_id: str, emit: Emit) -> RunRecord:
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
    spec = scenario.pressure_spec()
    cginfo = preflight(spec, scenario.workload_spec().total_mb, scenario.guest_memory)
    img = ensure(scenario.image)
    boot, kernel_facts = guest_kernel.resolve(scenario, img, emit)

    results.mkdir(parents=True, exist_ok=True)
    (results / "logs").mkdir(exist_ok=True)
    rec = RunRecord(run_id, results, scenario, HostFacts.here())
    rec.kernel = kernel_facts
    phases = Phases(emit)
    cfg = GuestConfig(
        boot=boot,
        root=img.disk,
        host_key=img.host_key,
        name="guest",
        memory_mb=scenario.guest_memory,
        cpus=scenario.guest_cpus_here(),
        accel=scenario.accel,
        thp=spec.thp_for(cginfo.version),
        kernel_under_test=scenario.kernel is not None or scenario.kernel_spec() is not None,
        saved_boots=_saved_boots(scenario, emit),
    )
    try:
        with UndoStack(run_id) as undo:
            pressure = Pressure(spec, cginfo, undo)
            _Experiment(scenario, cfg, pressure, undo, rec, emit).run(phases)
    except (UsageError, PreflightError):
        raise
    except (GuestBootFailed, GuestPanic) as err:
        if not cfg.kernel_under_test:  # the image's own kernel: the lab or image is at fault
            log.error("run %s: %s", run_id, err)
            rec.errors.append(str(err))
        else:
            log.error("run %s: the kernel under test did not boot: %s", run_id, err)
            rec.guest.boot_failure = str(err).splitlines()[0]
            rec.guest.boot_panic = isinstance(err, GuestPanic)
    except ApflabError as err:
        log.error("run %s: %s", run_id, err)
        rec.errors.append(str(err))
    except BaseException as err:  # SIGINT, SIGTERM, a bug: keep what the run had, go on
        rec.phases = phases.times
        _write_cut_short(rec, err)
        raise
    rec.phases = phases.times
    try:
        rec.write()
    except OSError as err:
        if full := disk_full(err, results):
            raise HostError(f"{full} (run.json not written): free space there") from err
        raise
    return rec


def _write_cut_short(rec: RunRecord, err: BaseException) -> None:
    """Keep what a run stopped by ``err`` had: run.json and an ERROR verdict.json.

    :raises HostError: the disk filled up (whatever still fits is written)
    """
    if full := disk_full(err, rec.results):
        rec.errors.append(full)
        with contextlib.suppress(OSError):  # what still fits
            rec.write()
            write_json(rec.results / "verdict.json", interrupted_document(rec, full))
        raise HostError(f"{full}: free space there") from err
    rec.errors.append(f"{cut_short(err)} during the run")
    rec.write()
    write_json(rec.results / "verdict.json", interrupted_document(rec, err))


def disk_full(err: BaseException, results: Path) -> str | None:
    """The words for a run stopped by a full disk (ENOSPC, EDQUOT), else None: not a
    bug of ours but the host's, named with the filesystem that filled."""
    if not is_disk_full(err):
        return None
    return f"the disk under {results} filled up during the run ({err.strerror})"


def cut_short(err: BaseException) -> str:
    """Why a run stopped before its end, in words: a signal, or a bug of ours."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (SIGINT, Ctrl-C)"
    if not isinstance(err, Exception):  # the CLI's Terminated: "terminated by signal 15"
        return f"interrupted ({err})"
    return f"stopped by an unexpected {type(err).__name__} ({err!r})"


def interrupted_document(rec: RunRecord, err: BaseException | str) -> dict[str, object]:
    """verdict.json of a run cut short (by ``err``, or for the reason given):
    ERROR, and where its partial evidence is."""
    doc = verdict.error_document(rec.run_id, err if isinstance(err, str) else cut_short(err))
    partial = trace_of(rec.results)
    doc["partial_trace"] = str(partial) if partial is not None else None
    doc["kernel"] = {**doc["kernel"], **(asdict(rec.kernel) if rec.kernel else {})}
    return doc


class _Experiment:
    """The phases of one run, in order; each leaves its evidence in ``rec``."""

    def __init__(
        self,
        scenario: Scenario,
        cfg: GuestConfig,
        pressure: Pressure,
        undo: UndoStack,
        rec: RunRecord,
        emit: Emit,
    ) -> None:
        self.scenario, self.cfg, self.pressure, self.undo = scenario, cfg, pressure, undo
        self.rec, self.emit = rec, emit
        rec.pressure = pressure.report  # filled in phase by phase
        # streamed straight into the results: a run cut short keeps what it traced
        self.raw = scenario.trace in ("on", "record")
        self.trace_out = rec.results / (RAW_TRACE if self.raw else PARTIAL_TRACE)
        self.session: tracefs.TraceSession | None = None

    def run(self, phases: Phases) -> None:
        with phases.phase("pressure setup (swap, cgroup)"):
            self.pressure.setup()
        with phases.phase("guest boot"):
            vm = self.boot()
        with phases.phase("guest checks"):
            self.checks(vm)
        if vm.accel == "kvm" and self.scenario.trace != "off":
            with phases.phase("trace start"):
                self.start_trace()
        with phases.phase("memory limit"):
            self.squeeze()
        with phases.phase("workload"):
            if self.session is not None:  # the guest's clock starts about here
                self.session.mark(WORKLOAD_START)
            wl = run_workload(
                vm, self.scenario.workload_spec(), self.scenario.deadline, self.watch(vm)
            )
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

    def watch(self, vm: Guest) -> Callable[[], None]:
        """While the workload runs: the guest alive, and (when tracing) the trace
        still kept and no stall."""
        if self.session is None:
            return vm.check_alive
        session = self.session
        stall = StallWatch(
            session.out_path,
            session.mark,
            vcpu_of_pid(self.rec.vcpus),
            self.scenario.verdict_bounds(paths.in_lab()).stall_s,
        )
        if stall.raw:
            session.on_pages = stall.feed_pages

        def watch() -> None:
            vm.check_alive()
            session.check()
            stall.poll()

        return watch

    def boot(self) -> Guest:
        rec = self.rec

        def move_into_cgroup(g: Guest) -> None:
            rec.guest.threads_in_cgroup = len(self.pressure.attach(g.pid))
            rec.guest.qemu_thp_enabled = _thp_enabled(g.pid)

        def host_at_save() -> dict[str, Any]:
            return {SAVED_PAGE_CACHE: self.pressure.page_cache_bytes()}

        vm = Guest(
            self.cfg,
            rec.results / "logs",
            self.undo,
            before_start=move_into_cgroup,
            on_save=host_at_save,
        )
        try:
            vm.start()  # on any error below, the undo stack kills QEMU (after the trace stops)
        finally:
            rec.retries[vm.boot_retries.name] = vm.boot_retries.to_dict()
        rec.guest.boot_seconds = round(vm.boot_seconds or 0, 1)
        rec.guest.boot_mode = vm.boot_mode
        rec.guest.saved_boot = vm.saved_boot
        if vm.saved_boot is not None:
            self.emit(
                f"          guest: saved boot {vm.saved_boot['key']} restored in "
                f"{rec.guest.boot_seconds}s (its cold boot took {vm.saved_boot['boot_seconds']}s)"
            )
        rec.guest.accel = vm.accel
        assert rec.kernel is not None
        rec.kernel.release = vm.run(["uname", "-r"]).stdout.strip()
        rec.vcpus = vm.vcpu_threads()
        return vm

    def checks(self, vm: Guest) -> None:
        g = self.rec.guest
        if vm.accel == "kvm":
            apf = guestinfo.apf_msrs(vm)
            g.async_pf = ApfFacts(apf.enabled and apf.interrupt_delivery, apf.describe())
            g.qmp_kvm_asyncpf_int = vm.qmp.cmd(
                "qom-get", path="/machine/unattached/device[0]", property="kvm-asyncpf-int"
            )
        # report hung tasks after 30 s instead of 120 s: a stalled guest shows it sooner
        g.hung_task_timeout_set = vm.run(
            ["sysctl", "-q", "-w", "kernel.hung_task_timeout_secs=30"], check=False
        ).ok
        g.hyp_before = guestinfo.hyp_interrupts(
            vm, self.rec.results / "guest" / "interrupts.before"
        )
        g.vmstat_before = guestinfo.vmstat(vm)

    def start_trace(self) -> None:
        self.session = tracefs.TraceSession(
            f"apflab-{self.rec.run_id}",
            self.trace_out,
            self.undo,
            buffer_kb=self.scenario.trace_buffer_kb,
            stream=self.scenario.trace in ("on", "text"),
            raw=self.raw,
            # recording: the same events as text too (a check of the raw decoder)
            text_twin=self.rec.results / PARTIAL_TRACE if self.scenario.trace == "record" else None,
        )
        self.session.start()
        (self.rec.results / "trace-formats.txt").write_text(self.session.formats())

    def squeeze(self) -> None:
        self.pressure.report.before = self.pressure.snapshot()
        self.pressure.save_raw(self.rec.results / "host", "before")
        saved = self.rec.guest.saved_boot or {}
        host = saved.get("host")
        credit = page_cache_credit(
            host if isinstance(host, dict) else None, self.pressure.page_cache_bytes()
        )
        self.pressure.apply(credit)
        if credit >> 20:
            self.emit(
                f"          memory: limit {self.scenario.limit} + {credit >> 20} MiB, the page "
                "cache the saved boot's cold boot held (the same squeeze as a cold boot)"
            )

    def evidence(self, vm: Guest) -> None:
        self.pressure.report.after = self.pressure.snapshot()
        self.pressure.save_raw(self.rec.results / "host", "after")
        self.pressure.finish()
        if not vm.is_running():
            oom = self.rec.pressure.events.get("oom_kill", 0)
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
        rec.trace.lost = stats.lost
        rec.trace.bytes = stats.bytes_written
        rec.trace.overrun = stats.overrun
        rec.trace.dropped = stats.dropped
        rec.trace.reader_cpu_s = stats.reader_cpu_s
        rec.trace.per_cpu = {str(k): v for k, v in stats.per_cpu.items()}
        for cpu, text in stats.raw.items():
            (rec.results / "host" / f"tracefs-cpu{cpu}-stats").write_text(text)
        as_text = rec.results / PARTIAL_TRACE
        if as_text.exists():
            compress(as_text, rec.results / "trace.txt.xz")
            as_text.unlink()
        rec.trace.path = self.trace_out if self.raw else rec.results / "trace.txt.xz"
        write_vcpus(rec.results, rec.vcpus)


def _guest_after(vm: Guest, rec: RunRecord) -> None:
    """Guest-side evidence after the workload; a stalled guest may not answer."""
    g: GuestFacts = rec.guest
    state = vm.runstate()
    g.runstate_after = state
    try:
        if state != "running":
            # e.g. a triple fault (reset) during the workload: the CPU state before
            # the reset is in logs/guest-cpu-reset.log (QEMU -d cpu_reset)
            raise VMError(f"the guest stopped running during the workload ({state})")
        if vm.panicked is not None:  # SSH would wait for a dead kernel until its timeout
            raise VMError(f"the guest kernel panicked during the workload: {vm.panicked}")
        g.hyp_after = guestinfo.hyp_interrupts(vm, rec.results / "guest" / "interrupts.after")
        g.vmstat_after = guestinfo.vmstat(vm)
        dmesg = vm.run(["dmesg"], check=False, timeout=30).stdout
        (rec.results / "logs" / "guest-dmesg.txt").write_text(dmesg)
        g.hung_tasks = guestinfo.parse_hung_tasks(dmesg)
    except ApflabError as err:
        g.after_error = f"guest did not answer after the workload: {err}"
        log.warning("%s", g.after_error)
    # a restored guest's boot lines (a WARN of the kernel under test) are in the
    # console of the boot it was saved from
    consoles = [c for c in (vm.saved_console, vm.console_log) if c is not None]
    g.console_faults = [line for c in consoles for line in console_faults(c)]
    g.reset = state != "running"
    # the console log sees hung-task reports even when SSH no longer works
    console = vm.console_log.read_text(errors="replace") if vm.console_log.exists() else ""
    g.hung_tasks = sorted(set(g.hung_tasks) | set(guestinfo.parse_hung_tasks(console)))
