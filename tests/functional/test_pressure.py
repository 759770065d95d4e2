"""Host memory pressure with cgroup v1 and a TCG guest: the cgroup and swap
machinery on its own, with real cgroups and real swap; the host must really swap
the guest's memory out and fault it back in.  (Under cgroup v2 with a KVM guest
the same is asserted by every PASS of test_apf.py.)
"""

import os
from pathlib import Path

from avocado import Test

from apflab.errors import PreflightError
from apflab.host import cgroup, leftovers
from apflab.run.experiment import execute
from apflab.run.records import RunRecord
from apflab.run.scenario import Scenario


class Pressure(Test):
    """
    :avocado: tags=pressure
    """

    timeout = 1200

    def run_experiment(self, **overrides: object) -> RunRecord:
        scenario = Scenario.from_params(self.params, **overrides)
        run_id = f"pressure-{self.name.uid}-{os.getpid()}"
        rec = execute(scenario, Path(self.outputdir) / run_id, run_id, self.log.info)
        self.assertEqual(rec.errors, [], "the run hit infrastructure errors")
        self.assertEqual(leftovers.find(run_id), [], "host changes left behind")
        expected_thp = scenario.pressure_spec().thp_for(rec.pressure.cgroup_version)
        self.assertIs(rec.guest.qemu_thp_enabled, expected_thp, "QEMU's THP flag")
        p = rec.pressure.to_dict()
        self.log.info("pressure: %s", {k: v for k, v in p.items() if k not in ("before", "after")})
        self.assertGreater(p["swap_out_mb"], 0, "the host did not swap the guest's memory out")
        self.assertGreater(p["major_faults"], 0, "no major faults in the guest's cgroup")
        assert rec.workload is not None
        self.assertTrue(rec.workload.completed, f"workload did not complete: {rec.workload.error}")
        guest_majflt = rec.guest.vmstat_after["pgmajfault"] - rec.guest.vmstat_before["pgmajfault"]
        self.log.info("guest-side major faults during the workload: %d", guest_majflt)
        return rec

    def test_cgroup_v1_tcg(self) -> None:
        try:
            info = cgroup.detect()
        except PreflightError as err:
            self.cancel(f"no memory cgroup: {err}")
        if info.version != 1:
            self.cancel("needs a cgroup v1 memory controller (this host has v2)")
        rec = self.run_experiment(accel="tcg")
        self.assertEqual(rec.pressure.cgroup_version, 1)
        p = rec.pressure.to_dict()
        self.whiteboard = f"swap-out {p['swap_out_mb']} MiB, major faults {p['major_faults']}"
