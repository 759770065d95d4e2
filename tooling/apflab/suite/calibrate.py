"""``apflab calibrate``: the runs behind docs/calibration.md, repeated and tabulated.

Each *cell* is a kernel (and its boot parameters); each runs ``samples`` times
through one lab that stays up (:class:`apflab.run.batch.Batch`).  The defaults
are the kernels issue's detection curve: the unpatched build, and the ack-faults
build with the ACK written late by D µs (``apflab_ack=delay:D``), plus the other
ways to break the ACK.  Every run keeps
its results dir; ``summary.json`` and ``summary.md`` hold the verdicts and the
percentiles of each metric, run by run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.run.batch import Batch
from apflab.run.scenario import Scenario

Emit = Callable[[str], None]

ACK_FAULTS = Path("guest_images/kernel/patches/ack-faults.patch")
DELAYS_US = (100, 250, 500, 1000, 5000)
#: the other ways to break the ACK (guest_images/kernel/patches/ack-faults.patch)
FAULT_MODES = ("zero", "before-clear", "every:2", "deferred:2000")
PERCENTILES = ("p10", "p50", "p90", "p99", "max")


@dataclass(frozen=True)
class Cell:
    """One kernel to run: a name, and what it changes in the scenario."""

    name: str
    patch: tuple[Path, ...] = ()
    cmdline: str = ""

    def scenario(self, base: Scenario) -> Scenario:
        if not self.patch:
            return replace(base, kernel_source="debian-6.1", cmdline=self.cmdline)
        return replace(base, patch=self.patch, cmdline=self.cmdline)


def default_cells(delays: Sequence[int], modes: Sequence[str]) -> list[Cell]:
    repo = paths.repo_root() or Path.cwd()
    faults = (repo / ACK_FAULTS,)
    cells = [Cell("unpatched")]
    cells += [Cell(f"delay-{d}us", faults, f"apflab_ack=delay:{d}") for d in delays]
    cells += [Cell(f"ack-{m.replace(':', '-')}", faults, f"apflab_ack={m}") for m in modes]
    return cells


def _row(cell: Cell, sample: int, doc: dict[str, Any], seconds: float) -> dict[str, Any]:
    lat = doc.get("latency_us") or {}
    return {
        "cell": cell.name,
        "sample": sample,
        "run_id": doc.get("run_id"),
        "verdict": doc.get("verdict"),
        "reason": doc.get("reason"),
        "seconds": round(seconds, 1),
        "async_pfs": (doc.get("events") or {}).get("not_present"),
        "latency_us": {m: {p: (lat.get(m) or {}).get(p) for p in PERCENTILES} for m in sorted(lat)},
    }


def calibrate(
    cells: Sequence[Cell], samples: int, results: Path, emit: Emit, base: Scenario | None = None
) -> Path:
    """Run every cell ``samples`` times, interleaved (cell after cell, then again), so
    that a slow spell of the machine does not fall on one cell only."""
    root = results.resolve() / paths.new_run_id("calibrate")
    root.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    with Batch(emit) as batch:
        for sample in range(1, samples + 1):
            for cell in cells:
                emit(f"== calibrate: {cell.name} sample {sample}/{samples}")
                t0 = time.monotonic()
                doc = batch.run(cell.scenario(base or Scenario()), root)
                rows.append(_row(cell, sample, doc, time.monotonic() - t0))
                emit(f"== {cell.name} #{sample}: {doc.get('verdict')}: {doc.get('reason')}")
                _write(root, rows)
    return root


def _write(root: Path, rows: list[dict[str, Any]]) -> None:
    (root / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "| cell | # | verdict | async PFs | ready→ACK p10 / p50 / p99 (µs) | queued p50 / p99 (µs) "
        "| np→ready p50 / p99 (µs) | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = r["latency_us"]

        def pick(metric: str, *ps: str, lat: dict[str, Any] = lat) -> str:
            return " / ".join(str((lat.get(metric) or {}).get(p)) for p in ps)

        lines.append(
            f"| {r['cell']} | {r['sample']} | {r['verdict']} | {r['async_pfs']} "
            f"| {pick('ready_to_ack', 'p10', 'p50', 'p99')} "
            f"| {pick('queued_completed_to_ready', 'p50', 'p99')} "
            f"| {pick('not_present_to_ready', 'p50', 'p99')} | {r['reason']} |"
        )
    (root / "summary.md").write_text("\n".join(lines) + "\n")
