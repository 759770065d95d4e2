"""The nested KVM lab: L1 under TCG with emulated SVM, real KVM inside it.

Runs on the host (it brings the lab up itself); inside the lab it cancels.
"""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from avocado import Test

from apflab import paths
from apflab.host import kvm, leftovers
from apflab.lab.l1 import Lab, LabConfig
from apflab.undo import UndoStack


class NestedLab(Test):
    """
    :avocado: tags=lab
    """

    timeout = 900

    def setUp(self) -> None:
        if paths.in_lab():
            self.cancel("already inside the lab: no lab within the lab")
        info = kvm.probe()
        accel = self.params.get("lab_accel", default=None) or ("tcg" if not info.usable else None)
        if accel is None:
            self.cancel(f"{info.reason}: this host needs no lab (set lab_accel=kvm to nest)")
        self.config = LabConfig(
            memory_mb=int(self.params.get("lab_memory", default=3072)),
            cpus=int(self.params.get("lab_cpus", default=1)),
            accel=str(accel),
        )

    def test_l1_kvm_and_l2_with_async_pf(self) -> None:
        """
        L1 has kvm_amd and KVM_CAP_ASYNC_PF_INT; an L2 in it boots under KVM with async
        PF by interrupt (every verdict of make check's kvm job shows the same, so this
        runs in the heavy tier: make check-heavy).

        :avocado: tags=heavy
        """
        undo = UndoStack(f"labtest-{self.name.uid}")
        with undo, Lab(self.config, Path(self.logdir), undo) as lab:
            facts = lab.facts
            self.log.info("L1 up in %.1fs; L1 facts: %s", lab.timings["l1_boot"], facts)
            self.assertEqual(facts["kvm"]["module"], "kvm_amd", "kvm_amd is not loaded in L1")
            self.assertTrue(facts["kvm"]["usable"], "/dev/kvm does not open in L1")
            self.assertEqual(facts["kvm"]["async_pf_int"], 1, "KVM_CAP_ASYNC_PF_INT missing")
            self.assertIn("kvm_amd", lab.run(["cat", "/proc/modules"]).stdout)

            boot = lab.run(
                ["apflab", "boot", "--json", "--log-dir", "/root/results/lab-boot"], timeout=600
            )
            report = json.loads(boot.stdout)
            self.log.info("L2 inside L1: %s", report)
            lab.fetch("/root/results/lab-boot", Path(self.logdir) / "L2")
            self.assertEqual(report["accel"], "kvm", "L2 did not run under KVM inside L1")
            self.assertEqual(report["qmp_status"]["status"], "running")
            self.assertEqual(report["ssh"], "ok")
            self.assertTrue(report["vcpu_threads_in_qemu"])
            self.assertTrue(report["async_pf"]["enabled"], report["async_pf"]["detail"])
            self.assertTrue(report["async_pf"]["interrupt"], report["async_pf"]["detail"])
            self.assertIs(report["async_pf"]["qmp_kvm_asyncpf_int"], True, "QMP CPU property")
            self.whiteboard = json.dumps(
                {"l1_boot_s": round(lab.timings["l1_boot"], 1), "l2_boot_s": report["boot_seconds"]}
            )
        self.assertEqual(leftovers.find(undo.run_id), [])

    def test_lab_cli_up_run_down(self) -> None:
        """`apflab lab up` leaves L1 running across commands; `lab run` streams a
        command in it and brings its results back; `lab down` leaves nothing."""
        results = Path(self.workdir) / "results"

        def apflab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
            proc = subprocess.run(
                [sys.executable, "-m", "apflab", *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            self.log.info(
                "apflab %s -> %d\n%s\n%s", args, proc.returncode, proc.stdout, proc.stderr[-3000:]
            )
            return proc

        up = apflab("lab", "up", "--log-dir", str(Path(self.logdir) / "L1"))
        run_id = None
        try:
            self.assertEqual(up.returncode, 0, up.stderr)
            self.assertIn("KVM_CAP_ASYNC_PF_INT=1", up.stdout)
            status = apflab("lab", "status")
            self.assertEqual(status.returncode, 0)
            # "lab up: run lab-<id>, L1 pid ...": only this lab's things are ours to check
            # (other apflab runs on the machine are not)
            run_id = status.stdout.split("run ", 1)[1].split(",", 1)[0]
            self.assertTrue(leftovers.qemu_processes(run_id), "L1 should outlive `lab up`")

            doctor = apflab(
                "lab", "run", "--results", str(results), "--", "apflab", "doctor", "--json"
            )
            self.assertEqual(doctor.returncode, 0, doctor.stderr)
            facts = json.loads(doctor.stdout)
            self.assertTrue(facts["in_lab"])
            self.assertEqual(facts["kvm"]["module"], "kvm_amd")

            made = apflab(
                "lab",
                "run",
                "--results",
                str(results),
                "--",
                "sh",
                "-c",
                "mkdir -p /root/results/cli-test && echo hello > /root/results/cli-test/out.txt",
            )
            self.assertEqual(made.returncode, 0, made.stderr)
            self.assertEqual((results / "cli-test" / "out.txt").read_text(), "hello\n")

            failed = apflab("lab", "run", "--results", str(results), "--", "false")
            self.assertEqual(failed.returncode, 1, "lab run must pass the exit status through")
        finally:
            down = apflab("lab", "down")
        self.assertEqual(down.returncode, 0, down.stderr)
        self.assertIsNotNone(run_id)
        self.assertEqual(leftovers.find(run_id), [], "lab down left something behind")

    def test_saved_l1(self) -> None:
        """L1 restored from a saved boot is a working lab with this lab's disks: the
        first lab boots cold and saves, a second restores the same saved boot with
        other assets in place; in it KVM works, an L2 boots under KVM with async PF
        by interrupt, the assets are the second lab's, the clock is now's."""
        store = Path(self.workdir) / "saved-labs"
        seen: list[dict[str, object]] = []
        for name in ("first", "second"):
            marker = Path(self.workdir) / f"marker-{name}"
            marker.write_text(f"assets of the {name} lab\n")
            cfg = dataclasses.replace(self.config, boot="saved", saved_dir=store, kernels=(marker,))
            undo = UndoStack(f"savedlab-{name}-{self.name.uid}")
            with undo, Lab(cfg, Path(self.logdir) / name, undo) as lab:
                vm = lab.require_vm()
                self.log.info(
                    "%s lab: L1 %s in %.1fs, saved boot %s",
                    name, lab.boot_mode, lab.timings["l1_boot"], vm.saved_boot,
                )  # fmt: skip
                self.assertEqual(lab.boot_mode, "restored")
                assert vm.saved_boot is not None
                seen.append({"key": vm.saved_boot["key"], "l1_boot_s": lab.timings["l1_boot"]})
                self.assertEqual(lab.facts["kvm"]["module"], "kvm_amd")
                self.assertEqual(lab.facts["kvm"]["async_pf_int"], 1)
                kernels = lab.run(["ls", "/mnt/apflab/kernels"]).stdout.split()
                self.assertEqual(kernels, [marker.name], "another lab's assets in this one")
                shipped = lab.run(["cat", f"/mnt/apflab/kernels/{marker.name}"]).stdout
                self.assertEqual(shipped, marker.read_text())
                l1_time = float(lab.run(["date", "+%s.%N"]).stdout)
                self.assertLess(abs(l1_time - time.time()), 5, "L1's clock is not now")
                if name == "second":
                    boot = lab.run(
                        ["apflab", "boot", "--json", "--log-dir", "/root/results/lab-boot"],
                        timeout=600,
                    )
                    report = json.loads(boot.stdout)
                    self.log.info("L2 inside the restored L1: %s", report)
                    self.assertEqual(report["accel"], "kvm")
                    self.assertEqual(report["ssh"], "ok")
                    self.assertTrue(report["async_pf"]["interrupt"], report["async_pf"]["detail"])
            self.assertEqual(leftovers.find(undo.run_id), [])
        self.assertEqual(seen[0]["key"], seen[1]["key"], "the second lab made its own saved boot")
        self.whiteboard = json.dumps(seen)
