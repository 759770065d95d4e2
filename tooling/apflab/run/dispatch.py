"""Where a run happens: directly on a KVM host, or through the nested lab.

:func:`run` is what ``apflab run`` / ``make run`` call.  On a host whose
/dev/kvm runs stock guests the experiment runs right here
(:func:`apflab.run.experiment.execute`, then :func:`apflab.run.judge.judge`);
otherwise the nested lab is brought up, ``apflab run --record-only`` runs the same
experiment in L1, streaming its phases, and its results directory is copied back
and judged here.
A failure of the lab itself is retried on a fresh L1 under the ``lab`` policy
(:mod:`apflab.retry`); a failure of the kernel under test never is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from apflab import kernel, paths
from apflab.analysis import verdict
from apflab.errors import ApflabError, UsageError
from apflab.host import doctor, kvm, procfs
from apflab.lab.assets import L1_RESULTS, SHIP_ROOT
from apflab.lab.l1 import Lab, LabConfig, ship
from apflab.lab.session import AttachedLab, attach
from apflab.retry import POLICIES, Retrier
from apflab.run.experiment import cut_short, execute
from apflab.run.guest_kernel import ensure_built
from apflab.run.judge import judge
from apflab.run.phases import Emit, Phases
from apflab.run.records import RUN_FILE, RunRecord, trace_of, write_json
from apflab.run.scenario import Scenario
from apflab.undo import UndoStack

log = logging.getLogger(__name__)


def point_latest(results_root: Path, run_id: str) -> None:
    latest = results_root / "latest"
    tmp = results_root / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_id)
    tmp.replace(latest)


def run(
    scenario: Scenario,
    results_root: Path,
    emit: Emit,
    run_id: str | None = None,
    here: bool = False,
    lab_config: LabConfig | None = None,
    record_only: bool = False,
) -> dict[str, Any]:
    """Run one experiment wherever real KVM is; return the verdict document.

    :param record_only: run here and stop at the record (run.json, the trace): the
        outer host judges it (how the lab's inner run is called)
    """
    scenario.validate()  # bad input fails here, in seconds, before any host change
    run_id = run_id or paths.new_run_id()
    results_root.mkdir(parents=True, exist_ok=True)
    info = kvm.probe()
    direct = here or record_only or info.usable or scenario.accel == "tcg"
    if direct and scenario.host_kernel_spec() is not None:
        raise UsageError(
            "--host-source/--host-patch/--host-config build the nested lab's L1 kernel, but "
            "this run goes direct on this host's KVM: boot the host kernel you want instead"
        )
    check_fits(scenario, None if direct else lab_config or LabConfig())
    doctor.preflight(direct=direct)  # tools, disk, cgroup: before any host change
    if record_only:
        emit(f"apflab run {run_id}: recording on this host ({info.reason})")
        rec = execute(scenario, results_root / run_id, run_id, emit)
        return {"run_id": run_id, "recorded": str(rec.results / "run.json")}
    if direct:
        emit(f"apflab run {run_id}: direct on this host ({info.reason})")
        doc = judge(execute(scenario, results_root / run_id, run_id, emit))
    else:
        emit(f"apflab run {run_id}: through the nested lab ({info.reason})")
        doc = _run_in_lab(scenario, results_root / run_id, run_id, emit, lab_config or LabConfig())
    point_latest(results_root, run_id)
    return doc


#: how long a run inside L1 may take to clean up after SIGTERM (guest stop, swapoff)
STOP_INNER_S = 90

#: what L1 itself needs beside the guest (kernel, systemd, QEMU's own, page cache)
L1_BASE_MB = 768


def check_fits(scenario: Scenario, lab: LabConfig | None) -> None:
    """Sizes must fit where the guest runs: this host, or L1 (``lab``) on this host.

    :raises UsageError: one line naming the option and the fix
    """
    avail = procfs.mem_available_mb()
    cpus = os.cpu_count() or 1
    if lab is not None:
        if scenario.swap_device is not None:
            raise UsageError(
                f"--swap-device {scenario.swap_device} names a disk of this host, but the run "
                "goes through the nested lab, which swaps to its own disk: drop --swap-device"
            )
        if lab.memory_mb > avail:
            raise UsageError(
                f"--lab-memory {lab.memory_mb} MB does not fit in this host's {avail} MB "
                "available: lower it"
            )
        room, cpus, where = lab.memory_mb - L1_BASE_MB, lab.cpus, "the lab's"
        fix = "raise --lab-memory or lower it"
    else:
        room, where, fix = avail, "this host's", "lower it"
    if scenario.guest_memory > room:
        raise UsageError(
            f"--guest-memory {scenario.guest_memory} MB does not fit in {where} {room} MB "
            f"available: {fix}"
        )
    trace_mb = scenario.trace_buffer_kb * cpus // 1024
    if trace_mb > room // 4:
        raise UsageError(
            f"--trace-buffer-kb {scenario.trace_buffer_kb}: {trace_mb} MB of trace buffers on "
            f"{cpus} CPU(s) do not fit in a quarter of {where} {room} MB: lower it"
        )


class _LabRun:
    """One run through the lab: what to ship into L1, what to run there, and the
    steps shared by a freshly booted L1 and an ``apflab lab up`` lab."""

    def __init__(self, scenario: Scenario, out: Path, run_id: str, emit: Emit) -> None:
        self.scenario, self.out, self.run_id, self.emit = scenario, out, run_id, emit
        self.phases = Phases(emit)
        self.built: list[tuple[Path, Path]] = []
        spec = scenario.kernel_spec()
        if spec is not None:  # built here: the lab has no kernel source
            with self.phases.phase("guest kernel build"):
                k = ensure_built(spec, emit)
            self.built.append((k.bzimage.parent, kernel.index_file(spec)))
        #: L1's own kernel, when the host-side KVM is under test
        self.host: kernel.BuiltKernel | None = None
        host_spec = scenario.host_kernel_spec()
        if host_spec is not None:
            with self.phases.phase("host (L1) kernel build"):
                self.host = ensure_built(host_spec, emit)
        #: what runs inside L1: the same scenario without what concerns L1 itself
        self.inner = replace(scenario, host_source=None, host_patch=(), host_config=())
        #: the run in L1's last ``apflab:`` line
        self.inner_said: str | None = None

    def host_kernel(self, lab_facts: dict[str, Any]) -> dict[str, Any]:
        """verdict.json's ``host_kernel``: L1's kernel, built here or the lab image's."""
        release = lab_facts.get("kernel_release")
        if self.host is None:
            return {"release": release, "source": {"kind": "image", "name": "lab"}}
        built = self.host.to_dict()
        keep = ("release", "sha256", "source", "patches", "configs", "key", "bzimage")
        return {k: built[k] for k in keep} | {"release_in_l1": release}

    def experiment(self, lab: Lab | AttachedLab) -> int:
        """Ship the run's files, run it in L1 (recording only), fetch its results."""
        where = f"{SHIP_ROOT}/{self.run_id}"
        with self.phases.phase("experiment in L1"):
            shipped = ship(lab.ssh, where, self.inner.files(), self.built)
            inner = ["env", f"APFLAB_KERNEL_CACHE={shipped.kernel_cache}"]
            inner += ["apflab", "run", "--record-only", "--run-id", self.run_id]
            inner += ["--results", L1_RESULTS, *self.inner.argv(file_dir=shipped.files)]
            try:
                res = lab.run(inner, check=False, timeout=None, on_output=indent_output(self.emit))
            except BaseException as err:  # interrupted here: stop it, keep what it has
                self._stop_inner(lab)
                self._keep_partial(lab, err)
                raise
            #: its last word (a run that could not even write run.json says why here)
            self.inner_said = _last_apflab_line(res.stdout + "\n" + res.stderr)
            lab.run(["rm", "-rf", where], check=False)
        with self.phases.phase("fetch results"):
            n = lab.fetch(f"{L1_RESULTS}/{self.run_id}", self.out)
            self.emit(f"          {n} file(s) copied back to {self.out}")
        return res.exit_status

    def _stop_inner(self, lab: Lab | AttachedLab) -> None:
        """SIGTERM the run inside L1 and wait for its cleanup (swap off, cgroup, guest):
        closing our SSH channel does not stop it, and a lab that stays up would keep
        an orphan holding its swap disk.  Best effort: L1 may be what failed."""
        # "[ ]": the pattern does not match pkill's own command line
        pattern = f"--run-id[ ]{self.run_id}"
        try:
            if lab.run(["pkill", "-TERM", "-f", "--", pattern], check=False, timeout=30).ok:
                self.emit(f"          stopping the run in L1 ({self.run_id})")
                deadline = time.monotonic() + STOP_INNER_S
                while time.monotonic() < deadline:
                    if not lab.run(["pgrep", "-f", "--", pattern], check=False, timeout=30).ok:
                        return
                    time.sleep(1)
                log.warning("the run in L1 did not stop within %ds", STOP_INNER_S)
        except ApflabError as stop_err:
            log.warning("could not stop the run in L1: %s", stop_err)

    def _keep_partial(self, lab: Lab | AttachedLab, err: BaseException) -> None:
        """Fetch what the run in L1 has written so far (logs, the partial trace) and
        say in verdict.json why it stops here; best effort, the lab may be gone."""
        try:
            lab.fetch(f"{L1_RESULTS}/{self.run_id}", self.out)
        except ApflabError as fetch_err:
            log.warning("could not fetch the partial results from L1: %s", fetch_err)
        self.out.mkdir(parents=True, exist_ok=True)
        why = f"{cut_short(err)} during the experiment in L1"
        doc = verdict.error_document(self.run_id, why)
        doc["partial_trace"] = str(t) if (t := trace_of(self.out)) is not None else None
        write_json(self.out / "verdict.json", doc)

    def judge(self, lab_facts: dict[str, Any], retries: dict[str, Any]) -> dict[str, Any]:
        if not (self.out / RUN_FILE).exists():
            # the run in L1 failed before it recorded anything (bad input only L1 could
            # see; L1's disk full): not a lab failure, so not retried; its verdict.json
            # is written here, beside whatever it left (logs, the partial trace)
            why = self.inner_said or "see the output above"
            doc = verdict.error_document(
                self.run_id,
                f"the run in L1 exited {lab_facts['inner_exit_status']} without a run.json: {why}",
            )
            doc["lab"] = lab_facts
            doc["partial_trace"] = str(t) if (t := trace_of(self.out)) is not None else None
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "verdict.json", doc)
            return doc
        # judged here, not in L1: the analysis and the report cost seconds on this host
        # and tens of seconds on L1's one emulated vCPU
        rec = RunRecord.load(self.out)
        rec.scenario = self.scenario  # as given here (L1 saw its files where they were shipped)
        if rec.kernel is not None and self.built:
            rec.kernel.path = str(self.built[0][0] / "bzImage")  # this host's copy
        rec.phases.update({f"host: {k}": v for k, v in self.phases.times.items()})
        rec.retries.update(retries)
        return judge(rec, extra={"lab": lab_facts, "host_kernel": self.host_kernel(lab_facts)})


def _run_in_session(run: _LabRun, lab: AttachedLab) -> dict[str, Any]:
    """Through the lab `apflab lab up` left running: no L1 boot, and no retry (an L1
    failure is the lab owner's to see)."""
    try:
        status = run.experiment(lab)
    finally:
        lab.close()
    facts: dict[str, Any] = {
        "session": lab.session.run_id,
        "kernel_release": lab.session.kernel_release,
        "inner_exit_status": status,
        "failures": [],
    }
    return run.judge(facts, {})


def _run_in_lab(
    scenario: Scenario, out: Path, run_id: str, emit: Emit, lab_config: LabConfig
) -> dict[str, Any]:
    run = _LabRun(scenario, out, run_id, emit)
    session = attach()
    if session is not None:
        emit(f"          using the lab that is up (run {session.session.run_id})")
        want = run.host.sha256 if run.host else None
        if want != session.session.host_kernel_sha256:
            session.close()
            raise UsageError(
                "the lab that is up runs another L1 kernel than this run asks for "
                "(--host-*): `apflab lab down` first, or `apflab lab up` with the same options"
            )
        return _run_in_session(run, session)
    if run.host is not None:
        lab_config = replace(lab_config, kernel=run.host.bzimage)
    retrier = Retrier(POLICIES["lab"], (ApflabError,))

    def attempt(number: int) -> dict[str, Any]:
        logs = out / "logs" if number == 1 else out / f"logs-lab-attempt{number}"
        return _lab_attempt(run, lab_config, logs)

    def report(err: BaseException) -> None:
        first = str(err).splitlines()[0]
        n = len(retrier.attempts)
        emit(f"          the lab failed (attempt {n} of {POLICIES['lab'].retries + 1}): {first}")

    try:
        lab_facts = retrier.run(attempt, between=report)
    except ApflabError as err:
        report(err)
        failed = verdict.error_document(run_id, f"lab: {str(err).splitlines()[0]}")
        failed["lab"] = {"failures": [a.error for a in retrier.attempts]}
        failed["retries"] = {"lab": retrier.to_dict()}
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "verdict.json", failed)
        return failed
    failures = [a.error for a in retrier.attempts if a.error is not None]
    return run.judge({**lab_facts, "failures": failures}, {"lab": retrier.to_dict()})


def _lab_attempt(run: _LabRun, lab_config: LabConfig, logs: Path) -> dict[str, Any]:
    """One lab bring-up + the run inside it + results fetched; raise on lab failure."""
    with UndoStack(f"{run.run_id}-lab") as undo:
        with run.phases.phase("lab up (images, assets, L1 boot)"):
            lab = Lab(lab_config, logs, undo)
            lab.up()
        try:
            run.emit(
                f"          L1 up ({lab.boot_mode}) in {lab.timings['l1_boot']:.1f}s; "
                f"{lab.facts['kvm']['reason']}"
            )
            status = run.experiment(lab)
        finally:
            with run.phases.phase("lab down"):
                lab.down()
    return {
        "timings_s": {k: round(v, 1) for k, v in lab.timings.items()},
        "boot_mode": lab.boot_mode,
        "kvm": lab.facts.get("kvm", {}),
        "kernel_release": lab.facts.get("kernel"),
        "inner_exit_status": status,
    }


def _last_apflab_line(output: str) -> str | None:
    """The last ``apflab: ...`` line a command printed (its one-line error), if any."""
    lines = [ln.strip() for ln in output.splitlines() if ln.startswith("apflab: ")]
    return lines[-1].removeprefix("apflab: ") if lines else None


def indent_output(
    emit: Emit, streams: tuple[str, ...] = ("stdout", "stderr")
) -> Callable[[str, str], None]:
    """An ``on_output`` for :meth:`Lab.run` that emits whole lines of ``streams`` as
    ``  L1| line`` (a chunk may end mid-line: the rest waits for the next one)."""
    buf = {"stdout": "", "stderr": ""}

    def on_output(stream: str, text: str) -> None:
        if stream not in streams:
            return
        buf[stream] += text
        *lines, buf[stream] = buf[stream].split("\n")
        for line in lines:
            emit(f"  L1| {line}")

    return on_output
