"""Ctrl-C, SIGTERM and SIGKILL in the middle of a run leave nothing behind.

Each test starts a real ``apflab`` command, waits until its QEMU is up (and,
for a pressure run, until the workload is running), interrupts it the way a
user or a CI timeout would, and then looks for anything of ours: QEMU
processes, run dirs, QMP sockets, run-state records, cgroups, swap areas,
tracefs instances.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from avocado import Test

from apflab.host import kvm, leftovers
from apflab.undo import pid_alive


class RunControl(Test):
    """Helpers: start an apflab command, wait for its output, interrupt, check."""

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log_dir = Path(self.logdir) / "run"
        argv = [sys.executable, "-m", "apflab", *args]
        argv += ["--log-dir" if args[0] == "boot" else "--results", str(log_dir)]
        self.log.info("starting %s", argv)
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        self.output = ""
        self.started = [*getattr(self, "started", []), proc]
        return proc

    def tearDown(self) -> None:
        """A test that failed half-way must not leave its apflab command running into
        the next test: SIGTERM (it unwinds), then SIGKILL."""
        for proc in getattr(self, "started", []):
            if proc.poll() is None:
                self.log.warning("stopping apflab (pid %d) the test left running", proc.pid)
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def pump(self, proc: subprocess.Popen[bytes]) -> bool:
        """Append what the command printed so far to self.output; False at EOF."""
        assert proc.stdout is not None
        try:
            chunk = os.read(proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return True
        self.output += chunk.decode(errors="replace")
        return bool(chunk)

    def wait_for(
        self, proc: subprocess.Popen[bytes], pattern: str, timeout: float
    ) -> re.Match[str]:
        """Read the command's output until ``pattern`` appears."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = self.pump(proc)
            m = re.search(pattern, self.output)
            if m:
                return m
            if not alive and proc.poll() is not None:
                break
            time.sleep(0.2)
        self.fail(f"never saw {pattern!r} within {timeout}s; output:\n{self.output[-3000:]}")
        raise AssertionError("unreachable: self.fail raises")

    def finish(self, proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
        """Wait for the command to exit after a signal; return its exit code."""
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            self.pump(proc)
            time.sleep(0.2)
        if proc.poll() is None:
            self.log.info("still running; output tail:\n%s", self.output[-4000:])
            proc.kill()
            self.fail(f"apflab did not exit within {timeout}s of the signal")
        while self.pump(proc):
            pass
        self.log.info("exit %s; output tail:\n%s", proc.returncode, self.output[-2000:])
        return proc.returncode

    def assert_clean(self, run_id: str, qemu_pid: int) -> None:
        self.assertFalse(pid_alive(qemu_pid, None), f"QEMU {qemu_pid} survived")
        self.assertEqual(leftovers.find(run_id), [])

    def qemu_of(self, run_id: str) -> int:
        found = leftovers.qemu_processes(run_id)
        self.assertEqual(len(found), 1, f"expected one QEMU of run {run_id}: {found}")
        return int(found[0].split()[1].rstrip(":"))

    def start_mid_workload(
        self, *args: str, settle: float = 5
    ) -> tuple[subprocess.Popen[bytes], str, int]:
        """Start ``apflab`` with ``args``, wait until its workload has run ``settle``
        seconds; return the process, the run id and the guest's QEMU pid."""
        proc = self.start(*args)
        run_id = self.wait_for(proc, r"apflab run (\S+):", 120).group(1)
        self.wait_for(proc, r"workload \.\.\.", 600)
        time.sleep(settle)
        return proc, run_id, self.qemu_of(run_id)


class Interrupt(RunControl):
    """
    :avocado: tags=boot,cleanup
    """

    timeout = 900

    def interrupt_boot(self, sig: int) -> tuple[int, str, int]:
        proc = self.start("boot", "--hold")
        run_id = self.wait_for(proc, r"boot run (\S+):", 120).group(1)
        qemu_pid = int(self.wait_for(proc, r"QEMU pid (\d+) up", 120).group(1))
        time.sleep(3)  # mid-boot: the guest kernel is running
        os.kill(proc.pid, sig)
        code = self.finish(proc)
        return code, run_id, qemu_pid

    def test_sigint_mid_boot(self) -> None:
        code, run_id, qemu_pid = self.interrupt_boot(signal.SIGINT)
        self.assertEqual(code, 130)
        self.assert_clean(run_id, qemu_pid)

    def test_sigterm_mid_boot(self) -> None:
        code, run_id, qemu_pid = self.interrupt_boot(signal.SIGTERM)
        self.assertEqual(code, 143)
        self.assert_clean(run_id, qemu_pid)

    def test_sigkill_then_cleanup(self) -> None:
        """SIGKILL cannot be caught: QEMU dies with its parent (pdeathsig), and
        `apflab cleanup` undoes the rest from the run-state record."""
        code, run_id, qemu_pid = self.interrupt_boot(signal.SIGKILL)
        self.assertEqual(code, -signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(qemu_pid, None) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertFalse(pid_alive(qemu_pid, None), "QEMU outlived its killed parent")
        self.assertNotEqual(leftovers.find(run_id), [], "a SIGKILLed run leaves its record")
        out = subprocess.run(
            [sys.executable, "-m", "apflab", "cleanup"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        self.log.info("cleanup said:\n%s", out)
        self.assertIn(run_id, out)
        self.assert_clean(run_id, qemu_pid)


class InterruptPressure(RunControl):
    """Ctrl-C during the workload of a pressure run: cgroup, swap and trace undone.

    :avocado: tags=pressure,cleanup
    """

    timeout = 900

    def test_sigint_mid_workload(self) -> None:
        args = [
            "run",
            "--limit",
            "256",
            "--working-set",
            "100",
            "--procs",
            "3",
            "--rounds",
            "50",
            "--deadline",
            "600",
        ]
        if not self.kvm_usable():
            args += ["--accel", "tcg"]
        proc, run_id, qemu_pid = self.start_mid_workload(*args, settle=10)
        self.assertNotEqual(leftovers.find(run_id), [], "the run's cgroup/swap should exist now")
        os.kill(proc.pid, signal.SIGINT)
        code = self.finish(proc, timeout=300)
        self.assertEqual(code, 130)
        self.assert_clean(run_id, qemu_pid)
        # nothing of the run is lost: its record, logs and a verdict saying why it stopped
        out = Path(self.logdir) / "run" / run_id
        doc = json.loads((out / "verdict.json").read_text())
        self.assertEqual(doc["verdict"], "ERROR")
        self.assertIn("interrupted", doc["reason"])
        self.assertTrue((out / "run.json").is_file(), "no run.json")
        self.assertTrue((out / "logs" / "guest-console.log").is_file(), "no console log")

    @staticmethod
    def kvm_usable() -> bool:
        return kvm.probe().usable
