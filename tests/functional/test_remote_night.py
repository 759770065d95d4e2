"""One night shared by two KVM hosts through Avocado's remote spawner, for real.

The hosts are two lab VMs (each an L1 with kvm_amd, booted here): ``apflab nightly
--hosts`` logs into each over SSH (its pinned host key), runs the apf test of every
cell there, brings the runs back and stores them in one store.  The cells are the
unpatched build (PASS) and the build without the ACK (FAIL); the kernels are built
here and shipped into both labs, as a lab of real hosts would have them cached.

Two L1s under TCG take both cores: this is the heavy tier (``make check-heavy``).
"""

import json
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from avocado import Test

from apflab import kernel
from apflab.host import leftovers
from apflab.lab.assets import L1_ENV
from apflab.lab.l1 import Lab, LabConfig, ship
from apflab.run.guest_kernel import ensure_built
from apflab.run.scenario import Scenario
from apflab.undo import UndoStack

MATRIX = """\
kernel: !mux
  unpatched:
    kernel_source: debian-6.1
    rounds: 1
  no_ack:
    patch: guest_images/kernel/patches/no-ack.patch
    rounds: 1
"""


class RemoteNight(Test):
    """
    :avocado: tags=remote,heavy,kvm
    """

    timeout = 5400

    def test_two_lab_vms_share_a_night(self) -> None:
        work = Path(self.workdir)
        matrix = work / "matrix.yaml"
        matrix.write_text(MATRIX)
        specs = [
            s
            for s in (
                Scenario(kernel_source="debian-6.1").kernel_spec(),
                Scenario(patch=(Path("guest_images/kernel/patches/no-ack.patch"),)).kernel_spec(),
            )
            if s is not None
        ]
        built = [
            (ensure_built(s, self.log.info).bzimage.parent, kernel.index_file(s)) for s in specs
        ]
        with ExitStack() as stack:
            hosts = []
            for i in (1, 2):
                # one undo stack (one run id: its run dirs) per lab
                undo = stack.enter_context(UndoStack(f"remote-{self.name.uid}-{i}"))
                lab = stack.enter_context(Lab(LabConfig(), work / f"lab{i}", undo))
                shipped = ship(lab.require_vm().ssh, "/root/night-kernels", [], built)
                vm = lab.require_vm()
                assert vm.client_key_path is not None
                hosts.append(
                    {
                        "name": f"lab{i}",
                        "port": vm.ssh_port,
                        "key": str(vm.client_key_path),
                        "host_key": vm.config.host_key,
                    }
                )
            hosts_file = work / "hosts.json"
            env = {**L1_ENV, "APFLAB_KERNEL_CACHE": shipped.kernel_cache}
            hosts_file.write_text(
                json.dumps(
                    {
                        "checkout": "/mnt/apflab/src",
                        "venv": "/opt/apflab/venv",
                        "env": env,
                        "hosts": hosts,
                    }
                )
            )
            night = subprocess.run(
                [
                    *(sys.executable, "-m", "apflab", "nightly", "--matrix", str(matrix)),
                    *("--samples", "2", "--hosts", str(hosts_file), "--night", "remote-1"),
                    *("--store", str(work / "apflab.db"), "--results", str(work / "results")),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            self.log.info("nightly -> %d\n%s\n%s", night.returncode, night.stdout, night.stderr)
        # the no-ack kernel FAILs: the night exits non-zero, and says why
        self.assertEqual(night.returncode, 1, night.stdout + night.stderr)
        roots = sorted((work / "results").glob("night-remote-1-*"))
        self.assertEqual(len(roots), 1, roots)
        doc = json.loads((roots[0] / "night.json").read_text())
        verdicts = sorted((r["cell"], r["verdict"]) for r in doc["runs"])
        self.assertEqual(
            verdicts,
            [("no_ack", "FAIL"), ("no_ack", "FAIL"), ("unpatched", "PASS"), ("unpatched", "PASS")],
        )
        self.assertEqual({r["host"] for r in doc["runs"]}, {"lab1", "lab2"}, "one host did all")
        self.assertTrue((roots[0] / "trend.html").is_file())
        history = subprocess.run(
            [
                sys.executable,
                "-m",
                "apflab",
                "history",
                "--store",
                str(work / "apflab.db"),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        self.assertEqual(len(json.loads(history.stdout)), 4, history.stdout)
        self.whiteboard = json.dumps({"runs": doc["runs"]}, default=str)[:4000]
        self.assertEqual(leftovers.find(f"remote-{self.name.uid}-"), [])
