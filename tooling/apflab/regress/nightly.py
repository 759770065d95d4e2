"""``apflab nightly``: kernels x scenarios x samples, stored, compared, reported.

The matrix is an Avocado yaml_to_mux variants file: each variant is a *cell*,
its params are the scenario options (the apf test's params: ``patch``,
``kernel_source``, ``cmdline``, ``limit``, ...), so the same file drives
``avocado run tests/functional/test_apf.py -m FILE``.  Every cell runs
``samples`` times (interleaved: cell after cell, then again) through one lab
per L1 kernel (:class:`apflab.run.batch.Batch`; cells with ``host_source`` /
``host_patch`` put the host kernel on an axis of the matrix); every run goes
into the results store with the night's name; then tonight is compared with
the baseline cell (apflab compare) and the whole history searched for changes
(:mod:`apflab.regress.changes`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apflab import kernel, paths
from apflab.errors import UsageError
from apflab.regress import changes, compare
from apflab.regress.store import Store
from apflab.run.batch import Batch
from apflab.run.matrix import Cell, cells_of

Emit = Callable[[str], None]


@dataclass(frozen=True)
class Night:
    name: str
    root: Path
    runs: list[dict[str, Any]]
    comparisons: dict[str, dict[str, Any]]
    findings: list[changes.Finding]

    @property
    def failed(self) -> bool:
        """A new FAIL or a regression tonight: the command exits non-zero."""
        return any(f.first_night == self.name for f in self.findings) or any(
            c["verdict"] == compare.FAIL for c in self.comparisons.values()
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "night": self.name,
            "root": str(self.root),
            "runs": self.runs,
            "comparisons": self.comparisons,
            "findings": [asdict(f) for f in self.findings],
            "failed": self.failed,
        }


def run_night(
    matrix: Path,
    samples: int,
    store_url: str,
    results: Path,
    emit: Emit,
    night: str | None = None,
    baseline: str | None = None,
) -> Night:
    cells, base = plan(matrix, emit, baseline)
    name, root = night_root(results, night)
    root.mkdir(parents=True)
    store = Store.open(store_url)
    runs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        with Batch(emit) as batch:
            for group, sample in _order(cells, samples):
                for cell in group:
                    emit(f"== night {name}: {cell.name} sample {sample}/{samples}")
                    doc = batch.run(cell.scenario, root / cell.name)
                    runs.append({"cell": cell.name, "sample": sample, **_brief(doc)})
                    if "events" in doc:  # a real verdict (not a lab failure)
                        store.add(doc, root / cell.name / str(doc["run_id"]), name, cell.name)
        comparisons = compare_tonight(root, cells, base)
        findings = changes.detect(store.history())
    finally:
        store.close()
    result = Night(name, root, runs, comparisons, findings)
    doc = {**result.to_dict(), "parallel": 1, "wall_s": round(time.monotonic() - t0, 1)}
    (root / "night.json").write_text(json.dumps(doc, indent=1) + "\n")
    return result


def plan(matrix: Path, emit: Emit, baseline: str | None) -> tuple[list[Cell], str]:
    """The night's cells, every one checked (:func:`check_cells`), and its baseline cell
    (default: the first), before anything boots: every way a night runs starts here.

    :raises UsageError: one line naming the cell and what is wrong
    """
    cells = cells_of(matrix)
    check_cells(cells, emit)
    base = baseline or cells[0].name
    if base not in {c.name for c in cells}:  # now, not after the night
        raise UsageError(f"baseline cell {base!r} is not in the matrix")
    return cells, base


def night_root(results: Path, night: str | None) -> tuple[str, Path]:
    """The night's name (default: today, UTC) and its own results dir (not made here)."""
    name = night or time.strftime("%Y-%m-%d", time.gmtime())
    return name, results.resolve() / paths.new_run_id(f"night-{name}")


def check_cells(cells: list[Cell], emit: Emit) -> None:
    """Every cell's input, before anything boots: its scenario, and each kernel it
    builds (sources, patches that apply, config symbols; :func:`apflab.kernel.check`).

    :raises UsageError: one line naming the cell and what is wrong
    """
    for cell in cells:
        try:
            cell.scenario.validate()
            for spec in (cell.scenario.kernel_spec(), cell.scenario.host_kernel_spec()):
                if spec is not None:
                    kernel.check(spec, emit)
        except UsageError as err:
            raise UsageError(f"matrix cell {cell.name}: {err}") from None


def _order(cells: list[Cell], samples: int) -> list[tuple[list[Cell], int]]:
    """The night's order: the cells grouped by L1 kernel (the host kernel axis: each
    group boots one lab), and within a group sample 1 of every cell, then sample 2, ...
    (so a slow drift of the machine spreads over all cells alike)."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(repr(cell.scenario.host_kernel_spec()), []).append(cell)
    return [(group, n) for group in groups.values() for n in range(1, samples + 1)]


def _brief(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc.get(k) for k in ("run_id", "verdict", "reason")}


def compare_tonight(root: Path, cells: list[Cell], base: str) -> dict[str, dict[str, Any]]:
    names = [c.name for c in cells]
    if base not in names:
        raise UsageError(f"baseline cell {base!r} is not in the matrix ({', '.join(names)})")
    out = {}
    for cell in cells:
        if cell.name == base:
            continue
        doc = compare.compare_dirs(
            [root / cell.name], [root / base], root / "compare" / cell.name, compare.Rules()
        )
        out[cell.name] = {k: doc[k] for k in ("verdict", "reason", "report")}
        out[cell.name]["slower"] = [  # every metric that is slower, not only the first
            {k: c[k] for k in ("metric", "statistic", "ratio", "ci", "p_value")}
            for c in doc["changes"]
            if c["verdict"] == compare.FAIL
        ]
    return out
