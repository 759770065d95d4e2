"""Faults: each ends with its reason, keeps its logs, and leaves nothing behind.

Every test starts real ``apflab`` runs (a TCG guest under real cgroup and swap
pressure, so they run on any host), breaks them the way a fault would, and
then scans for anything of ours.  ``make check`` runs the quick one (the guest's
QEMU killed mid-workload); ``make check-faults`` runs them all (tags=faults).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from test_interrupt import RunControl

from apflab.host import cgroup, kvm, leftovers
from apflab.undo import pid_alive

PRESSURE_RUN = ("run", "--accel", "tcg", "--rounds", "50", "--deadline", "600")


class Faults(RunControl):
    """
    :avocado: tags=faults,cleanup
    """

    timeout = 900

    def verdict_of(self, run_id: str) -> dict[str, Any]:
        path = Path(self.logdir) / "run" / run_id / "verdict.json"
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc

    def test_guest_qemu_killed_mid_workload(self) -> None:
        proc, run_id, qemu = self.start_mid_workload(*PRESSURE_RUN)
        os.kill(qemu, signal.SIGKILL)
        code = self.finish(proc, timeout=300)
        self.assertEqual(code, 3, "a dead guest QEMU is an infrastructure ERROR")
        doc = self.verdict_of(run_id)
        self.assertEqual(doc["verdict"], "ERROR")
        self.assertIn("QEMU", doc["reason"])
        logs = Path(self.logdir) / "run" / run_id / "logs"
        self.assertTrue((logs / "guest-console.log").is_file(), "the console log was lost")
        self.assert_clean(run_id, qemu)

    def test_guest_hangs_with_ssh_dead(self) -> None:
        """
        :avocado: tags=heavy
        """
        proc, run_id, qemu = self.start_mid_workload(*PRESSURE_RUN)
        os.kill(qemu, signal.SIGSTOP)  # the whole VM freezes: no SSH, no QMP
        t0 = time.monotonic()
        code = self.finish(proc, timeout=400)
        took = time.monotonic() - t0
        self.log.info("exit %d %.0fs after the freeze", code, took)
        self.assertIn(code, (1, 2, 3), "a frozen guest must end the run, not hang it")
        self.assertIn(self.verdict_of(run_id)["verdict"], ("FAIL", "INVALID", "ERROR"))
        self.assert_clean(run_id, qemu)

    def test_guest_kernel_panic(self) -> None:
        """The guest kernel panics mid-workload (sysrq ``c``, written over the run's own
        SSH forward with its per-run key): a fault of the kernel, so FAIL, named.

        :avocado: tags=heavy
        """
        proc, run_id, qemu = self.start_mid_workload(*PRESSURE_RUN, "--boot", "cold")
        argv = Path(f"/proc/{qemu}/cmdline").read_bytes().decode().split("\0")
        fwd = re.search(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-", " ".join(argv))
        assert fwd is not None, argv
        port = int(fwd.group(1))
        qmp = next(a for a in argv if "qmp.sock" in a)
        key = Path(qmp.split("path=", 1)[1].split(",", 1)[0]).with_name("id_ed25519")
        self.sysrq_crash(port, key)
        t0 = time.monotonic()
        code = self.finish(proc, timeout=400)
        self.log.info("exit %d %.0fs after the panic", code, time.monotonic() - t0)
        doc = self.verdict_of(run_id)
        self.assertEqual((code, doc["verdict"]), (1, "FAIL"), doc["reason"])
        self.assertIn("panic", doc["reason"].lower())
        console = Path(self.logdir) / "run" / run_id / "logs" / "guest-console.log"
        self.assertIn("Kernel panic", console.read_text(errors="replace"))
        self.assert_clean(run_id, qemu)

    def sysrq_crash(self, port: int, key: Path) -> None:
        import paramiko  # noqa: PLC0415

        client = paramiko.SSHClient()
        # our own guest behind our own 127.0.0.1 forward; its host key is the run's
        # concern (pinned there), not this fault injector's
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        client.connect(
            "127.0.0.1", port, "root", pkey=paramiko.PKey.from_path(key), timeout=30,
            look_for_keys=False, allow_agent=False,
        )  # fmt: skip
        try:
            chan = client.get_transport().open_session()  # type: ignore[union-attr]
            chan.exec_command("sync; echo c > /proc/sysrq-trigger")
            time.sleep(3)
        finally:
            client.close()

    def test_memory_cgroup_oom_kills_qemu(self) -> None:
        """The run's memory cgroup loses its swap mid-workload (as another agent on the
        host could do to it): the kernel's OOM killer kills QEMU; the run is an ERROR
        that names the OOM killer and the fix.

        :avocado: tags=heavy
        """
        proc, run_id, qemu = self.start_mid_workload(*PRESSURE_RUN)
        info = cgroup.detect()
        groups = [g for g in info.parent.glob("apflab-*") if run_id in g.name]
        self.assertEqual(len(groups), 1, groups)
        knob = ("memory.swappiness", "0") if info.version == 1 else ("memory.swap.max", "0")
        (groups[0] / knob[0]).write_text(knob[1])
        self.log.info("%s: %s = %s", groups[0], *knob)
        code = self.finish(proc, timeout=300)
        doc = self.verdict_of(run_id)
        self.assertEqual((code, doc["verdict"]), (3, "ERROR"), doc["reason"])
        self.assertIn("OOM killer", doc["reason"])
        self.assert_clean(run_id, qemu)

    def test_l1_killed_mid_workload(self) -> None:
        """L1 (the nested lab's QEMU) killed mid-workload: retried once on a fresh lab (a
        known fault of TCG's nested SVM), and killed again there: ERROR, both attempts'
        logs kept, nothing left.

        :avocado: tags=heavy
        """
        if kvm.probe().usable:
            self.cancel("this host runs guests on its own KVM: there is no L1 to kill")
        proc = self.start("run", "--rounds", "50")
        run_id = self.wait_for(proc, r"apflab run (\S+):", 120).group(1)
        killed = []
        for attempt in (1, 2):
            start = len(self.output)
            deadline = time.monotonic() + 600
            while not re.search(r"workload \.\.\.", self.output[start:]):
                self.assertLess(time.monotonic(), deadline, self.output[-3000:])
                self.pump(proc)
                time.sleep(0.2)
            time.sleep(5)
            l1 = [p for p in leftovers.qemu_processes("-name") if " -name L1," in p]
            pids = [int(p.split()[1].rstrip(":")) for p in l1]
            self.log.info("attempt %d: killing L1 %s", attempt, pids)
            self.assertEqual(len(pids), 1, l1)
            os.kill(pids[0], signal.SIGKILL)
            killed += pids
        code = self.finish(proc, timeout=300)
        doc = self.verdict_of(run_id)
        self.assertEqual((code, doc["verdict"]), (3, "ERROR"), doc["reason"])
        self.assertIn("lab", doc["reason"])
        self.assertEqual(len(doc["lab"]["failures"]), 2, doc["lab"])
        out = Path(self.logdir) / "run" / run_id
        for logs in ("logs", "logs-lab-attempt2"):
            self.assertTrue(any((out / logs).glob("*console*")), f"no console log in {logs}")
        for pid in killed:
            self.assert_clean(run_id, pid)

    def test_lab_disk_fills_while_the_trace_streams(self) -> None:
        """L1's disk (where the run in L1 streams its trace) fills up mid-workload: an
        ERROR that says so, verdict.json on this host, nothing left once the lab is down.

        :avocado: tags=heavy
        """
        if kvm.probe().usable:
            self.cancel("this host runs guests on its own KVM: no lab disk to fill")
        lab = [sys.executable, "-m", "apflab", "lab"]
        in_lab = [*lab, "run", "--results", str(Path(self.logdir) / "lab-run"), "--"]
        up = subprocess.run([*lab, "up"], capture_output=True, text=True, check=False)
        self.log.info("lab up -> %d\n%s", up.returncode, up.stderr[-2000:])
        self.assertEqual(up.returncode, 0, up.stderr[-2000:])
        try:
            proc = self.start("run", "--rounds", "50")
            run_id = self.wait_for(proc, r"apflab run (\S+):", 120).group(1)
            self.wait_for(proc, r"L1\| .*workload \.\.\.", 600)
            time.sleep(5)
            fill = ["dd", "if=/dev/zero", "of=/root/apflab-fill", "bs=1M", "status=none"]
            filled = subprocess.run([*in_lab, *fill], capture_output=True, text=True, check=False)
            self.log.info("fill -> %d %s", filled.returncode, filled.stderr[-500:])
            self.assertIn("No space left", filled.stdout + filled.stderr)
            full_at = time.monotonic()
            code = self.finish(proc, timeout=600)
            # the trace is no longer kept: the run stops at once (it used to run its 50
            # rounds out, ~6 min, before it said so)
            self.assertLess(time.monotonic() - full_at, 90, "the run went on with a full disk")
            doc = self.verdict_of(run_id)
            self.log.info("verdict %s: %s", doc["verdict"], doc["reason"])
            self.assertEqual((code, doc["verdict"]), (3, "ERROR"), doc["reason"])
            self.assertIn("No space left", doc["reason"])
            self.assertNotIn("Traceback", self.output, "a traceback reached the user")
        finally:
            subprocess.run([*in_lab, "rm", "-f", "/root/apflab-fill"], check=False)
            down = subprocess.run([*lab, "down"], capture_output=True, text=True, check=False)
            self.log.info("lab down -> %d %s", down.returncode, down.stderr[-1000:])
        self.assertEqual(leftovers.find(), [], "the lab or the run left something behind")

    def test_sigkill_of_the_runner_then_cleanup(self) -> None:
        """
        :avocado: tags=heavy
        """
        proc, run_id, qemu = self.start_mid_workload(*PRESSURE_RUN)
        os.kill(proc.pid, signal.SIGKILL)
        self.finish(proc)
        deadline = time.monotonic() + 15
        while pid_alive(qemu, None) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertFalse(pid_alive(qemu, None), "QEMU outlived its killed runner")
        self.assertNotEqual(leftovers.find(run_id), [], "the cgroup and swap should remain")
        out = subprocess.run(
            [sys.executable, "-m", "apflab", "cleanup"], capture_output=True, text=True, check=True
        ).stdout
        self.assertIn(run_id, out)
        self.assert_clean(run_id, qemu)

    def test_two_runs_at_once(self) -> None:
        """
        :avocado: tags=heavy
        """
        short = ("run", "--accel", "tcg", "--rounds", "1")
        first = self.start(*short)
        output_first = self.output
        time.sleep(5)
        second = self.start(*short, "--run-id", f"second-{os.getpid()}")
        codes = [self.finish(second, 600)]
        self.output = output_first
        codes.append(self.finish(first, 600))
        self.assertEqual(codes, [2, 2], "two pressure-only runs: both INVALID (TCG), neither ERROR")
        self.assertEqual(leftovers.find(f"second-{os.getpid()}"), [])

    def test_avocado_timeout_leaves_nothing(self) -> None:
        """A plain ``avocado run`` whose test hits its timeout (SIGTERM, then SIGKILL a
        second later: Avocado's default) — apflab's Avocado plugin cleans up after it.

        :avocado: tags=heavy
        """
        repo = Path(__file__).resolve().parents[2]
        job = Path(self.workdir) / "job"
        argv = [
            str(Path(sys.executable).with_name("avocado")),
            "run",
            "--job-results-dir",
            str(job),
            "tests/functional/test_pressure.py:Pressure.test_cgroup_v1_tcg",
            *("-p", "timeout=33"),
            # a workload that outlasts the timeout (one round ends within it: 21 s)
            *("-p", "rounds=50"),
        ]
        res = subprocess.run(argv, cwd=repo, capture_output=True, text=True, check=False)
        self.log.info("%s", res.stdout[-2000:])
        self.assertIn("INTERRUPTED", res.stdout)
        inner = (job / "latest").resolve() / "test-results"
        logs = "".join(p.read_text(errors="replace") for p in inner.glob("*/debug.log"))
        self.assertIn("workload ...", logs, "the timeout came before the host changes")
        self.assertEqual(leftovers.qemu_processes("pressure-"), [], "QEMU outlived the test")
        self.assertEqual(leftovers.find("pressure-"), [], "the timed-out test left things behind")
