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

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.analysis.thresholds import Thresholds
from apflab.errors import UsageError
from apflab.run.batch import Batch
from apflab.run.judge import judge
from apflab.run.records import RunRecord
from apflab.run.scenario import Scenario

Emit = Callable[[str], None]

ACK_FAULTS = Path("guest_images/kernel/patches/ack-faults.patch")
DELAYS_US = (100, 250, 500, 1000, 5000)
#: the other ways to break the ACK (guest_images/kernel/patches/ack-faults.patch)
FAULT_MODES = ("zero", "before-clear", "every:2", "deferred:2000", "spike:40000")
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


def summarize(root: Path, emit: Emit) -> Path:
    """Judge every run of a calibration again with this apflab (a rule or a metric
    added since it ran), then rewrite its summary, the detection table
    (``detection.md``: per cell, how many runs FAIL and why) and the plot of the
    floor statistic (``ready-to-ack-p10.png``).

    :raises UsageError: ``root`` holds no summary.json of a calibration
    """
    try:
        old = json.loads((root / "summary.json").read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{root}: not a calibration dir (summary.json: {err})") from None
    rows = []
    for row in old:
        run_dir = root / str(row["run_id"])
        try:
            rec = RunRecord.load(run_dir)
        except (OSError, ValueError, KeyError, TypeError):
            emit(f"  {row['cell']} #{row['sample']}: {row['verdict']} (no run.json: kept as is)")
            rows.append(row)
            continue
        before = json.loads((run_dir / "verdict.json").read_text())
        extra = {k: before[k] for k in ("lab", "host_kernel") if k in before}
        doc = judge(rec, extra=extra)
        emit(f"  {row['cell']} #{row['sample']}: {doc['verdict']}: {doc['reason']}")
        rows.append(_row(Cell(str(row["cell"])), int(row["sample"]), doc, float(row["seconds"])))
    _write(root, rows)
    (root / "detection.md").write_text(detection_table(rows))
    floor = Thresholds().latency_p10_us.get("ready_to_ack")
    (root / "ready-to-ack-p10.png").write_bytes(p10_plot(rows, floor))
    return root


def detection_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per cell: runs, verdicts, the range of ready→ACK p10 / p50 (over the runs
    that were judged PASS or FAIL) and the reasons."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault(str(r["cell"]), []).append(r)
    lines = [
        "| cell | runs | FAIL | PASS | other | ready→ACK p10 (µs) | ready→ACK p50 (µs) "
        "| async PFs | FAIL reasons |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in cells.items():
        verdicts = [r["verdict"] for r in runs]
        judged = [r for r in runs if r["verdict"] in ("PASS", "FAIL")]
        p10 = [v for r in judged if (v := _pct(r, "ready_to_ack", "p10")) is not None]
        p50 = [v for r in judged if (v := _pct(r, "ready_to_ack", "p50")) is not None]
        pfs = [int(r["async_pfs"]) for r in judged if r.get("async_pfs") is not None]
        reasons = sorted({_reason_kind(str(r["reason"])) for r in runs if r["verdict"] == "FAIL"})
        lines.append(
            f"| {name} | {len(runs)} | {verdicts.count('FAIL')} | {verdicts.count('PASS')} "
            f"| {len(runs) - verdicts.count('FAIL') - verdicts.count('PASS')} "
            f"| {_span(p10)} | {_span(p50)} | {_span(pfs)} | {'; '.join(reasons)} |"
        )
    return "\n".join(lines) + "\n"


def _pct(row: dict[str, Any], metric: str, p: str) -> int | None:
    value = ((row.get("latency_us") or {}).get(metric) or {}).get(p)
    return int(value) if value is not None else None


def _span(values: Sequence[int]) -> str:
    return f"{min(values)}..{max(values)}" if values else "-"


def _reason_kind(reason: str) -> str:
    """A FAIL reason without its numbers (the rule that fired)."""
    return reason.split(":", maxsplit=1)[0]


def p10_plot(rows: Sequence[dict[str, Any]], floor: int | None) -> bytes:
    """ready→ACK p10 of every run, by cell, with the floor the verdict applies."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    names = list(dict.fromkeys(str(r["cell"]) for r in rows))
    fig = Figure(figsize=(8.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for x, name in enumerate(names):
        for r in rows:
            value = _pct(r, "ready_to_ack", "p10")
            if r["cell"] == name and value is not None:
                colour = "tab:red" if r["verdict"] == "FAIL" else "tab:green"
                ax.plot([x], [value], "o", color=colour, alpha=0.7)
    if floor is not None:
        ax.axhline(floor, color="black", linestyle="--", linewidth=1)
        ax.text(len(names) - 0.5, floor, f" floor {floor} µs", va="bottom", ha="right")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ready→ACK p10 (µs)")
    ax.set_title("every calibration run (green PASS, red FAIL)", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return buf.getvalue()
