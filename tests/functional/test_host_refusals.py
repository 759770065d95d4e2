"""What this host lacks or has taken, refused or worked around, on the real host.

Two inputs of the bad-input table that need a real host rather than an argument:
no memory cgroup controller (taken away in a private mount namespace, so the
host's own hierarchies stay as they are) and an SSH forward port that another
process holds (a real listening socket, a real QEMU that cannot bind it).
"""

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from avocado import Test

from apflab.errors import PortInUse
from apflab.host import leftovers
from apflab.images.build import ensure
from apflab.undo import UndoStack
from apflab.vm import qemu
from apflab.vm.qemu import Guest, GuestConfig

#: run in a new mount namespace (unshare): unmount every cgroup hierarchy that
#: has the memory controller, there only, then run the apflab command in argv
WITHOUT_MEMORY_CGROUP = """
import os, subprocess, sys
for line in open("/proc/self/mountinfo"):
    left, _, right = line.partition(" - ")
    point, (fstype, _, opts) = left.split()[4], right.split()[:3]
    v2_memory = fstype == "cgroup2" and "memory" in open(
        os.path.join(point, "cgroup.controllers")).read().split()
    if v2_memory or (fstype == "cgroup" and "memory" in opts.split(",")):
        subprocess.run(["umount", "-l", point], check=True)
os.execv(sys.argv[1], sys.argv[1:])
"""


class HostRefusals(Test):
    """
    :avocado: tags=cleanup,refusals
    """

    timeout = 300

    def test_no_memory_cgroup_controller(self) -> None:
        """With no memory controller mounted, `apflab run` is refused in seconds with
        one line and exit 4, and `apflab doctor` names the problem and fails."""
        before = leftovers.find()
        unshare = ["unshare", "--mount", "--propagation", "private", "--"]
        helper = [sys.executable, "-c", WITHOUT_MEMORY_CGROUP]
        t0 = time.monotonic()
        run = subprocess.run(
            [*unshare, *helper, sys.executable, "-m", "apflab", "run", "--accel", "tcg",
             "--results", str(Path(self.workdir) / "results")],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        took = time.monotonic() - t0
        self.log.info("run: exit %d in %.2fs: %s", run.returncode, took, run.stderr)
        self.assertEqual(run.returncode, 4, run.stderr)
        lines = [line for line in run.stderr.splitlines() if line.startswith("apflab")]
        self.assertEqual(len(lines), 1, run.stderr)
        self.assertIn("no cgroup memory controller is mounted", lines[0])
        self.assertNotIn("Traceback", run.stderr + run.stdout)
        self.assertLess(took, 5.0)

        doctor = subprocess.run(
            [*unshare, *helper, sys.executable, "-m", "apflab", "doctor"],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        self.log.info("doctor: exit %d:\n%s%s", doctor.returncode, doctor.stdout, doctor.stderr)
        self.assertIn("cgroup:   no cgroup memory controller is mounted", doctor.stdout)
        # a run through the lab needs no cgroup here (L1 has its own); a direct one does
        lab_path = "\npath:     lab " in doctor.stdout
        self.assertEqual(doctor.returncode == 0, lab_path, doctor.stdout)
        # the namespace's unmounts stayed there: this host still has its controller
        self.assertEqual(leftovers.find(), before)

    def config(self) -> GuestConfig:
        img = ensure("guest")
        return GuestConfig(
            boot=img.boot_spec(""), root=img.disk, host_key=img.host_key, memory_mb=256, cpus=1
        )

    def test_forward_port_taken(self) -> None:
        """Another process listens on the port apflab chose for the guest's SSH
        forward: QEMU cannot bind it, and the launch is retried on a fresh port;
        a port that stays taken ends in one named error after the retries."""
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            taken = holder.getsockname()[1]

            free = qemu.free_tcp_port

            def taken_first() -> Iterator[int]:
                yield taken
                while True:
                    yield free()

            ports = taken_first()
            undo = UndoStack(f"port-{self.name.uid}")
            with undo, mock.patch.object(qemu, "free_tcp_port", lambda: next(ports)):
                vm = Guest(self.config(), Path(self.logdir), undo)
                try:
                    vm.launch()
                    self.log.info("taken %d; QEMU runs with port %d", taken, vm.ssh_port)
                    self.assertNotEqual(vm.ssh_port, taken)
                    status = vm.qmp.cmd("query-status")
                    assert isinstance(status, dict), status
                    self.assertIn(status["status"], ("running", "prelaunch"), status)
                finally:
                    vm.shutdown()
            self.assertEqual(leftovers.find(undo.run_id), [])

            undo = UndoStack(f"port-always-{self.name.uid}")
            with (
                undo,
                mock.patch.object(qemu, "free_tcp_port", lambda: taken),
                self.assertRaises(PortInUse) as caught,
            ):
                vm = Guest(self.config(), Path(self.logdir), undo)
                try:
                    vm.launch()
                finally:
                    vm.shutdown()
            self.log.info("always taken: %s", caught.exception)
            self.assertIn("host forwarding", caught.exception.console_tail)
            self.assertIn(f"127.0.0.1:{taken}", " ".join(caught.exception.argv))
            self.assertEqual(leftovers.find(undo.run_id), [])
