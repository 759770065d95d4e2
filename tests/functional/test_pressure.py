"""Host memory pressure: cgroup v2 with a KVM guest (async PFs counted), and
cgroup v1 with a TCG guest (the cgroup and swap machinery on its own).

Both use real cgroups and real swap, and verify that the host really swapped
the guest's memory out and faulted it back in.
"""

import os
from pathlib import Path

from avocado import Test

from apflab.analysis import parse
from apflab.errors import PreflightError
from apflab.host import cgroup, kvm, leftovers
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

    def test_cgroup_v2_kvm_async_pf(self) -> None:
        info = kvm.probe()
        if not info.usable:
            self.cancel(f"needs real KVM ({info.reason}); runs in the lab phase")
        if cgroup.detect().version != 2:
            self.cancel("needs a cgroup v2 memory controller")
        rec = self.run_experiment()
        self.assertEqual(rec.pressure.cgroup_version, 2)
        assert rec.trace.path is not None
        counts: dict[str, int] = {}
        with parse.open_trace(rec.trace.path) as f:
            for ev in parse.iter_events(f):
                counts[ev.kind.name] = counts.get(ev.kind.name, 0) + 1
        not_present = counts.get(parse.Kind.NOT_PRESENT.name, 0)
        self.log.info("trace event counts: %s", counts)
        workload = rec.workload
        assert workload is not None
        p = rec.pressure.to_dict()
        self.whiteboard = (
            f"swap-out {p['swap_out_mb']} MiB, major faults {p['major_faults']}, "
            f"async PFs {not_present}, workload {workload.seconds:.0f}s"
        )
        self.assertGreaterEqual(
            not_present,
            int(self.params.get("min_async_pf", default=10000)),
            "the default scenario must produce >= 10,000 async PFs",
        )

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
