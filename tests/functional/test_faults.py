"""Faults: each ends with its reason, keeps its logs, and leaves nothing behind.

Every test starts real ``apflab`` runs (a TCG guest under real cgroup and swap
pressure, so they run on any host), breaks them the way a fault would, and
then scans for anything of ours.  ``make check`` runs the quick one (the guest's
QEMU killed mid-workload); ``make check-faults`` runs them all (tags=faults).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from test_interrupt import RunControl

from apflab.host import leftovers
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
            "-p",
            "timeout=33",
        ]
        res = subprocess.run(argv, cwd=repo, capture_output=True, text=True, check=False)
        self.log.info("%s", res.stdout[-2000:])
        self.assertIn("INTERRUPTED", res.stdout)
        self.assertEqual(leftovers.qemu_processes("pressure-"), [], "QEMU outlived the test")
        self.assertEqual(leftovers.find("pressure-"), [], "the timed-out test left things behind")
