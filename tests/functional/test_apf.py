"""The async-PF latency verdict: lab → guest → pressure → trace → verdict.

The test fails with the verdict's reason unless the kernel under test PASSes;
verdict.json and report.html land in the test's output dir.  Set the param
``expect`` to FAIL to run a negative control (a kernel without the ACK write
must FAIL, never PASS or ERROR).
"""

import os
from pathlib import Path

from avocado import Test

from apflab.host import kvm, leftovers
from apflab.run.experiment import execute
from apflab.run.judge import judge
from apflab.run.scenario import Scenario


class AsyncPfVerdict(Test):
    """
    :avocado: tags=apf
    """

    timeout = 1500

    def test_verdict(self) -> None:
        info = kvm.probe()
        if not info.usable:
            self.cancel(f"needs real KVM ({info.reason}); runs in the lab phase")
        expect = self.params.get("expect", default="PASS")
        scenario = Scenario.from_params(self.params)
        run_id = f"apf-{self.name.uid}-{os.getpid()}"
        out = Path(self.outputdir)
        rec = execute(scenario, out, run_id, self.log.info)
        doc = judge(rec)
        self.assertEqual(leftovers.find(run_id), [], "host changes left behind")
        self.assertTrue((out / "verdict.json").is_file())
        self.assertTrue((out / "report.html").is_file())
        lat = doc["latency_us"]["not_present_to_ready"]
        self.whiteboard = (
            f"{doc['verdict']}: not_present {doc['events']['not_present']}, "
            f"ready {doc['events']['ready']}, ack {doc['events']['ack']}, lost "
            f"{doc['events']['lost']}; np->ready p50 {lat['p50']} p99 {lat['p99']} us"
        )
        self.log.info("verdict %s: %s", doc["verdict"], doc["reason"])
        if doc["verdict"] != expect:
            self.fail(f"expected {expect}, got {doc['verdict']}: {doc['reason']}")
