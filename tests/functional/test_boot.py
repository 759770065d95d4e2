"""Boot a real guest, drive it over QMP and SSH, shut it down cleanly.

Runs on any host: under KVM where /dev/kvm runs stock guests (bare metal, or
inside the nested lab), under TCG elsewhere.
"""

from pathlib import Path

from avocado import Test

from apflab import paths
from apflab.errors import VMLaunchError
from apflab.host import leftovers
from apflab.images.build import ensure
from apflab.undo import UndoStack
from apflab.vm.qemu import BootSpec, Guest, GuestConfig


class Boot(Test):
    """
    :avocado: tags=boot
    """

    timeout = 600

    def config(self, **overrides: object) -> GuestConfig:
        img = ensure(self.params.get("image", default="guest"))
        self.image = img
        fields = dict(
            boot=img.boot_spec(self.params.get("cmdline", default="")),
            root=img.disk,
            host_key=img.host_key,
            memory_mb=int(self.params.get("guest_memory", default=1024)),
            cpus=int(self.params.get("guest_cpus", default=paths.default_guest_cpus())),
        )
        fields.update(overrides)
        return GuestConfig(**fields)  # type: ignore[arg-type]

    def test_boot_qmp_ssh_shutdown(self) -> None:
        cfg = self.config()
        undo = UndoStack(f"boot-{self.name.uid}")
        with undo, Guest(cfg, Path(self.logdir), undo) as vm:
            self.log.info("%s; SSH ready %.1fs after launch", vm.accel_reason, vm.boot_seconds)
            self.whiteboard = f"{vm.accel} boot {vm.boot_seconds:.1f}s"

            status = vm.qmp.cmd("query-status")
            assert isinstance(status, dict), status
            self.assertEqual(status["status"], "running", status)

            release = vm.run(["uname", "-r"]).stdout.strip()
            self.assertEqual(release, self.image.manifest["kernel_release"])

            threads = vm.vcpu_threads()
            self.assertEqual(sorted(threads), list(range(cfg.cpus)))
            for index, tid in threads.items():
                task = Path(f"/proc/{vm.pid}/task/{tid}")
                self.assertTrue(task.is_dir(), f"vCPU {index} thread {tid} is not a QEMU thread")
                self.assertIn(
                    "CPU", (task / "comm").read_text(), "vCPU threads are named CPU n/..."
                )

            failed = vm.run(["false"], check=False)
            self.assertEqual(failed.exit_status, 1)
            pid, run_dir = vm.pid, vm.run_dir
            assert run_dir is not None
            qmp_socket = run_dir / "qmp.sock"
            self.assertTrue(qmp_socket.exists())

        self.assertFalse(Path(f"/proc/{pid}").exists(), "QEMU still running after shutdown")
        self.assertFalse(qmp_socket.exists(), "QMP socket left behind")
        self.assertFalse(run_dir.exists(), "run dir left behind")
        self.assertEqual(leftovers.find(undo.run_id), [])

    def test_launch_failure_is_reported(self) -> None:
        """A kernel QEMU cannot load fails the launch with argv, exit code and log tail."""
        not_a_kernel = Path(self.workdir) / "not-a-kernel"
        not_a_kernel.write_text("this is not a bzImage\n")
        cfg = self.config(boot=BootSpec(not_a_kernel, None, "console=ttyS0"))
        with (
            UndoStack(f"bad-{self.name.uid}") as undo,
            self.assertRaises(VMLaunchError) as caught,
            Guest(cfg, Path(self.logdir), undo),
        ):
            pass
        err = caught.exception
        self.assertIn(str(not_a_kernel), " ".join(err.argv))
        self.assertIsNotNone(err.exitcode)
        self.assertNotEqual(err.exitcode, 0)
        self.assertIn("kernel", err.console_tail.lower())
        self.assertEqual(leftovers.find(undo.run_id), [])
