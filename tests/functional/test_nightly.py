"""A one-cell night: the matrix machinery end to end on a real run.

``apflab nightly`` on a one-variant matrix (the unpatched build, one round of the
workload, one sample): the run lands in a SQLite store, ``apflab history`` finds it,
the trend report and its xunit are written, and a second import of the same run
stores nothing twice.
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
    rounds: 1
"""


class OneCellNight(Test):
    """
    :avocado: tags=nightly,kvm
    """

    timeout = 1200

    def apflab(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "apflab", *args], capture_output=True, text=True, check=False
        )
        self.log.info(
            "apflab %s -> %d\n%s\n%s", args, proc.returncode, proc.stdout, proc.stderr[-3000:]
        )
        return proc

    def test_one_cell_night(self) -> None:
        work = Path(self.workdir)
        matrix = work / "one-cell.yaml"
        matrix.write_text(ONE_CELL)
        store = str(work / "apflab.db")
        night = self.apflab(
            "nightly",
            "--matrix",
            str(matrix),
            "--samples",
            "1",
            "--night",
            "night-1",
            "--store",
            store,
            "--results",
            str(work / "results"),
        )
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
