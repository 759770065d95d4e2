"""The async-PF latency verdict: lab → guest → pressure → trace → verdict.

One run of ``apflab run`` (apflab.run.dispatch): on a KVM host right here,
otherwise through the nested lab (the one ``apflab lab up`` left running, when
there is one).  The test holds the verdict to the param ``expect`` (PASS by
default) and, when given, its reason to ``expect_reason``: tests/functional/
controls.yaml makes this one test the suite's positive and negative controls
(a kernel without the ACK write must FAIL, never PASS or ERROR).
verdict.json and report.html land in the test's output dir.
"""

from pathlib import Path

from avocado import Test

from apflab import paths
from apflab.host import leftovers
from apflab.run import dispatch
from apflab.run.scenario import Scenario


class AsyncPfVerdict(Test):
    """
    :avocado: tags=apf,kvm
    """

    timeout = 1500

    def test_verdict(self) -> None:
        expect = self.params.get("expect", default="PASS")
        reason = self.params.get("expect_reason", default=None)
        min_async_pf = int(self.params.get("min_async_pf", default=0))
        scenario = Scenario.from_params(self.params)
        # unique on this machine across nights (the store keys runs by machine and id;
        # the runner numbers every test 1)
        run_id = paths.new_run_id("apf")
        out = Path(self.outputdir)
        doc = dispatch.run(scenario, out, self.log.info, run_id=run_id)
        self.assertEqual(leftovers.find(run_id), [], "host changes left behind")
        for name in ("verdict.json", "report.html"):
            self.assertTrue((out / run_id / name).is_file(), f"no {name}")
        events = doc["events"]
        lat = doc["latency_us"]["not_present_to_ready"]
        self.whiteboard = (
            f"{doc['verdict']}: not_present {events['not_present']}, ready {events['ready']}, "
            f"ack {events['ack']}, lost {events['lost']}; np->ready p50 {lat['p50']} "
            f"p99 {lat['p99']} us; {doc['reason']}"
        )
        self.log.info("verdict %s: %s", doc["verdict"], doc["reason"])
        if doc["verdict"] != expect:
            self.fail(f"expected {expect}, got {doc['verdict']}: {doc['reason']}")
        if reason is not None:
            self.assertIn(reason, doc["reason"], "the verdict is right but not its reason")
        if expect == "PASS":
            self.assert_pressure(doc, min_async_pf)

    def assert_pressure(self, doc: dict, min_async_pf: int) -> None:  # type: ignore[type-arg]
        """A PASS must come from a run that really put the guest under pressure."""
        pressure = doc["pressure"]
        self.assertGreater(pressure["swap_out_mb"], 0, "the host did not swap the guest out")
        self.assertGreater(pressure["major_faults"], 0, "no major faults in the guest's cgroup")
        self.assertTrue(doc["workload"]["completed"], "the workload did not complete")
        self.assertGreaterEqual(
            doc["events"]["not_present"], min_async_pf, f"fewer than {min_async_pf} async PFs"
        )
