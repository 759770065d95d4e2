"""Boot a real guest, drive it over QMP and SSH, shut it down cleanly.

Runs on any host: under KVM where /dev/kvm runs stock guests (bare metal, or
inside the nested lab), under TCG elsewhere.
"""

import subprocess
from pathlib import Path

from avocado import Test

from apflab import paths
from apflab.errors import SSHError, VMLaunchError
from apflab.host import leftovers
from apflab.images.build import ensure
from apflab.undo import UndoStack
from apflab.vm import keys, snapshot
from apflab.vm.qemu import BootSpec, Guest, GuestConfig
from apflab.vm.ssh import SSH


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

    def test_security(self) -> None:
        """A changed host key is refused; run and QMP dirs are 0700; the SSH forward
        listens on 127.0.0.1 only; no private key reaches the logs."""
        cfg = self.config()
        undo = UndoStack(f"sec-{self.name.uid}")
        logs = Path(self.logdir) / "guest"
        with undo, Guest(cfg, logs, undo) as vm:
            assert vm.run_dir is not None and vm.client_key_path is not None
            for d in (vm.run_dir, paths.runtime_root()):
                self.assertEqual(d.stat().st_mode & 0o777, 0o700, f"{d} is not 0700")
            self.assertEqual(vm.client_key_path.stat().st_mode & 0o777, 0o600)
            ss = subprocess.run(
                ["ss", "-Hltn", f"sport = :{vm.ssh_port}"],
                capture_output=True,
                text=True,
                check=True,
            )
            # State Recv-Q Send-Q Local-Address:Port Peer-Address:Port
            local = [line.split()[3] for line in ss.stdout.splitlines() if line.strip()]
            self.assertEqual(local, [f"127.0.0.1:{vm.ssh_port}"], "the forward is not on loopback")
            other = keys.generate_client_key(Path(self.workdir), "not-the-guest")
            wrong = SSH(
                "127.0.0.1",
                vm.ssh_port,
                "root",
                keys.ClientKey(vm.client_key_path, "").load(),
                keys.parse_public_key(other.public_line),
                "guest",
            )
            with self.assertRaises(SSHError) as refused:
                wrong.connect(timeout=30)
            self.assertIn("host key mismatch", str(refused.exception))
        for f in logs.rglob("*"):
            if f.is_file():
                self.assertNotIn(b"PRIVATE KEY", f.read_bytes(), f"key material in {f}")

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

    def test_saved_boot(self) -> None:
        """A saved boot restores the same guest (its clock goes on from the save) from
        the same starting point every time; each run gets its own key and the saved
        key is locked out."""
        store_root = Path(self.workdir) / "saved-boots"
        cfg = self.config(saved_boots=store_root)
        undo = UndoStack(f"saved-{self.name.uid}")
        with undo, Guest(cfg, Path(self.logdir) / "first", undo) as first:
            self.assertEqual(first.boot_mode, "restored")
            assert first.saved_boot is not None and first.boot_seconds is not None
            cold_s = float(first.saved_boot["boot_seconds"])
            uptime = float(first.run(["cat", "/proc/uptime"]).stdout.split()[0])
            # the restored guest's clock went on from the save, it did not boot again
            self.assertGreaterEqual(uptime, cold_s / 2, "the guest booted anew")
            self.assertEqual(
                first.run(["uname", "-r"]).stdout.strip(), self.image.manifest["kernel_release"]
            )
            saved = snapshot.Store(store_root).lookup(first.saved_boot["key"])
            assert saved is not None
            self.assertEqual(saved.directory.stat().st_mode & 0o777, 0o700)
            self.assertEqual((saved.directory / "id_ed25519").stat().st_mode & 0o777, 0o600)
            locked_out = SSH(
                "127.0.0.1",
                first.ssh_port,
                "root",
                saved.client_key().load(),
                keys.parse_public_key(cfg.host_key),
                "guest",
            )
            with self.assertRaises(SSHError):
                locked_out.connect(timeout=30)
            first.run(["sh", "-c", "echo first > /root/written-by-first; sync"])
            first_key = first.client_key_path
        undo2 = UndoStack(f"saved2-{self.name.uid}")
        with undo2, Guest(cfg, Path(self.logdir) / "second", undo2) as second:
            assert second.saved_boot is not None and second.boot_seconds is not None
            self.assertEqual(second.saved_boot["key"], saved.key)
            self.assertNotEqual(second.client_key_path, first_key)
            seen = second.run(["ls", "/root"]).stdout.split()
            self.assertNotIn("written-by-first", seen, "a run's writes leaked into the next")
            self.log.info("cold boot %.1fs; restored in %.1fs", cold_s, second.boot_seconds)
            # how much faster is for make bench to say, not for a timed assertion here
            self.whiteboard = f"cold {cold_s:.1f}s restored {second.boot_seconds:.1f}s"
        self.assertEqual(
            [d.name for d in store_root.iterdir() if not d.name.startswith(".")], [saved.key]
        )
        self.assertEqual(leftovers.find(undo.run_id) + leftovers.find(undo2.run_id), [])
