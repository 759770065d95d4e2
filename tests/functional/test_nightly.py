"""Nights end to end on real runs.

``OneCellNight`` (make check): ``apflab nightly`` on a one-variant matrix (the
unpatched build, two rounds of the workload (the default), one sample): the run lands in a SQLite
store, ``apflab history`` finds it, the trend report and its xunit are written, and a
second import of the same run stores nothing twice.

``FullNight`` (make check-night): tests/functional/nightly.yaml, three kernels x three
samples, then a second night with the late ACK made longer (1 ms -> 3 ms): the two
broken kernels are flagged on the first night and not the unpatched one, and the
second night is a latency regression of the late-ACK kernel named by that night.

``ParallelNight`` (make check-night): the first of those nights again, two cells at a
time, each in a lab of its own (``--parallel 2``): the same verdicts and findings.

``HostKernelNight`` (make check-host; it boots L1 on its own host kernels, so no lab
may be up): tests/functional/host_night.yaml, the host kernel as the axis: a host
whose KVM delays each page-ready by 2 ms must FAIL against the unpatched host build.
"""

import json
import subprocess
import sys
from pathlib import Path

from avocado import Test

ONE_CELL = """\
kernel: !mux
  unpatched:
    kernel_source: debian-6.1
    rounds: 2
"""


class Night(Test):
    """Runs ``apflab`` and logs what it said."""

    def apflab(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "apflab", *args], capture_output=True, text=True, check=False
        )
        self.log.info(
            "apflab %s -> %d\n%s\n%s", args, proc.returncode, proc.stdout, proc.stderr[-3000:]
        )
        return proc

    def nightly(
        self, matrix: Path, samples: int, work: Path, night: str | None = None, *extra: str
    ) -> subprocess.CompletedProcess[str]:
        """``apflab nightly`` on ``matrix``, its store and results under ``work``."""
        named = ["--night", night] if night is not None else []
        return self.apflab(
            "nightly",
            *("--matrix", str(matrix), "--samples", str(samples), *named, *extra),
            *("--store", str(work / "apflab.db"), "--results", str(work / "results")),
        )

    def night(
        self, matrix: Path, name: str, *extra: str
    ) -> tuple[subprocess.CompletedProcess[str], dict]:  # type: ignore[type-arg]
        work = Path(self.logdir)  # kept with the test's logs (the workdir is removed)
        proc = self.nightly(matrix, 3, work, name, *extra)
        roots = sorted((work / "results").glob(f"night-{name}-*"))
        self.assertEqual(len(roots), 1, proc.stdout + proc.stderr)
        for f in ("trend.html", "trend.xml", "night.json"):
            self.assertTrue((roots[0] / f).is_file(), f"no {f}")
        doc = json.loads((roots[0] / "night.json").read_text())
        self.log.info("night %s: %s", name, (roots[0] / "trend.html"))
        return proc, doc

    @staticmethod
    def by_cell(doc: dict) -> dict[str, list[str]]:  # type: ignore[type-arg]
        """night.json's run verdicts, cell by cell, in run order."""
        verdicts: dict[str, list[str]] = {}
        for r in doc["runs"]:
            verdicts.setdefault(r["cell"], []).append(r["verdict"])
        return verdicts

    def assert_nightly_yaml(
        self,
        proc: subprocess.CompletedProcess[str],
        doc: dict,  # type: ignore[type-arg]
        name: str,
    ) -> None:
        """A first night of nightly.yaml x 3: the verdicts, the two broken kernels (and
        not the unpatched one) flagged by this night, both FAIL against the baseline."""
        self.assertEqual(
            self.by_cell(doc),
            {"unpatched": ["PASS"] * 3, "no_ack": ["FAIL"] * 3, "late_ack": ["FAIL"] * 3},
            doc["runs"],
        )
        flagged = {f["kernel"] for f in doc["findings"] if f["first_night"] == name}
        self.assertEqual(flagged, {"no_ack", "late_ack"}, doc["findings"])
        self.assertEqual(doc["comparisons"]["no_ack"]["verdict"], "FAIL")
        self.assertEqual(doc["comparisons"]["late_ack"]["verdict"], "FAIL")
        self.assertNotEqual(proc.returncode, 0, "two broken kernels must fail the night")


class OneCellNight(Night):
    """
    :avocado: tags=nightly,kvm
    """

    timeout = 1200

    def test_one_cell_night(self) -> None:
        work = Path(self.workdir)
        matrix = work / "one-cell.yaml"
        matrix.write_text(ONE_CELL)
        store = str(work / "apflab.db")
        night = self.nightly(matrix, 1, work, "night-1")
        self.assertEqual(night.returncode, 0, night.stdout + night.stderr)
        roots = sorted((work / "results").glob("night-night-1-*"))
        self.assertEqual(len(roots), 1)
        root = roots[0]
        doc = json.loads((root / "night.json").read_text())
        self.assertEqual([r["verdict"] for r in doc["runs"]], ["PASS"], doc["runs"])
        for name in ("trend.html", "trend.xml"):
            self.assertTrue((root / name).is_file(), f"no {name}")
        history = self.apflab("history", "--store", store, "--json")
        rows = json.loads(history.stdout)
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0]["night"], "night-1")
        self.assertIn("ready_to_ack", rows[0]["metrics"])
        again = self.apflab("history", "--store", store, "--import", str(root / "unpatched"))
        self.assertIn("imported 0 run(s), 1 already stored", again.stderr)
        self.whiteboard = f"night-1: {doc['runs'][0]['reason']}"


NIGHTLY = Path(__file__).with_name("nightly.yaml")


class FullNight(Night):
    """
    :avocado: tags=nightly,night_full,heavy
    """

    timeout = 5400

    def test_two_nights(self) -> None:
        first, doc = self.night(NIGHTLY, "night-1")
        self.assert_nightly_yaml(first, doc, "night-1")
        longer = Path(self.logdir) / "nightly-longer.yaml"
        longer.write_text(
            NIGHTLY.read_text().replace("apflab_ack=delay:1000", "apflab_ack=delay:3000")
        )
        second, doc2 = self.night(longer, "night-2")
        slow = [
            f
            for f in doc2["findings"]
            if f["kind"] == "latency regression" and f["first_night"] == "night-2"
        ]
        self.assertIn("late_ack", {f["kernel"] for f in slow}, doc2["findings"])
        self.assertNotIn("unpatched", {f["kernel"] for f in slow}, doc2["findings"])
        self.assertIn("ready_to_ack", {f["metric"] for f in slow})
        self.assertIn("NEW latency regression: late_ack", second.stdout)
        self.assertNotEqual(second.returncode, 0)
        self.whiteboard = "; ".join(f["detail"] for f in slow)


class ParallelNight(Night):
    """
    :avocado: tags=nightly,night_full,parallel,heavy
    """

    timeout = 3600

    def test_two_labs_at_once(self) -> None:
        """FullNight's first night, two cells at a time (each in a lab of its own): the
        same verdicts and the same two kernels flagged; its wall time is in night.json
        beside the serial night's (docs/scale.md)."""
        proc, doc = self.night(NIGHTLY, "night-p", "--parallel", "2")
        self.assertEqual(doc["parallel"], 2)
        self.assert_nightly_yaml(proc, doc, "night-p")
        self.whiteboard = f"9 runs, 2 at a time: {doc['wall_s']} s"


HOST_NIGHT = Path(__file__).with_name("host_night.yaml")


class HostKernelNight(Night):
    """
    :avocado: tags=nightly,host_kernel,heavy
    """

    timeout = 3600

    def test_delayed_page_ready_host_fails_against_the_unpatched_host(self) -> None:
        work = Path(self.logdir)  # kept with the test's logs (the workdir is removed)
        store = str(work / "apflab.db")
        night = self.nightly(HOST_NIGHT, 4, work)
        roots = sorted((work / "results").glob("night-*"))
        self.assertEqual(len(roots), 1, night.stdout + night.stderr)
        doc = json.loads((roots[0] / "night.json").read_text())
        verdicts = self.by_cell(doc)
        self.log.info("verdicts %s", verdicts)
        self.assertEqual(verdicts["host_unpatched"], ["PASS"] * 4, doc["runs"])
        self.assertNotIn("ERROR", verdicts["host_ready_delayed_2ms"], doc["runs"])
        cmp = doc["comparisons"]["host_ready_delayed_2ms"]
        slower = [f"{c['metric']} {c['statistic']} x{c['ratio']:.2f}" for c in cmp["slower"]]
        self.log.info("slower than the unpatched host: %s", slower)
        self.whiteboard = f"{cmp['verdict']}: {cmp['reason']}; slower: {', '.join(slower)}"
        self.assertEqual(cmp["verdict"], "FAIL", cmp["reason"])
        self.assertTrue(slower, "a FAIL against the baseline names the slower metrics")
        self.assertNotEqual(night.returncode, 0, "a regression tonight must fail the night")
        rows = json.loads(self.apflab("history", "--store", store, "--json").stdout)
        patched = [r for r in rows if r["kernel"] == "host_ready_delayed_2ms"]
        self.assertEqual(len(patched), 4)
        names = [Path(p["path"]).name for p in patched[0]["host_kernel"]["patches"]]
        self.assertEqual(names, ["delay-page-ready.patch", "delay-page-ready-2000us.patch"])
