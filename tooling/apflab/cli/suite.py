"""``apflab bench | check-functional``: the project's own benchmarks and test suite."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.cli.args import existing_trace, positive_int
from apflab.cli.exitcodes import EXIT_OK
from apflab.cli.output import emit
from apflab.errors import UsageError
from apflab.suite import bench, calibrate, perf, tracerate
from apflab.suite.functional import check_functional


def cmd_bench(args: argparse.Namespace) -> int:
    if args.trace_flood:
        paths.runtime_root().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="flood-", dir=paths.runtime_root()) as work:
            rows = tracerate.sweep(
                list(args.trace_flood), list(args.flood_buffers), args.flood_seconds, Path(work)
            )
        print(json.dumps({"floods": rows, "knee": tracerate.knee(rows)}, indent=1))
        return EXIT_OK
    if args.observer:
        root = args.results.resolve() / paths.new_run_id("observer")
        doc = perf.observer_overhead(root, args.samples, emit)
        (args.results / "observer.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    trace = args.trace or bench.default_trace()
    if args.full:
        doc = perf.bench(args.results, trace, args.samples, args.cold, emit, args.knee_buffers)
        print(json.dumps(doc, indent=1) if args.json else format_full(doc))
        return EXIT_OK
    result = bench.bench_analyzer(trace, args.repeat)
    result["peak_rss_mib"] = perf.peak_rss_mib(trace)
    print(json.dumps(result, indent=1) if args.json else format_bench(result))
    return EXIT_OK


def format_full(doc: dict[str, Any]) -> str:
    """The table of make bench."""
    rows = [
        ("warm run (s)", doc.get("warm_run_s"), "<= 60"),
        ("  its page-readies", doc.get("warm_run_events"), ">= 10,000"),
        ("  10,000th page-ready (workload s)", doc.get("warm_run_10k_ready_workload_s"), "-"),
        ("cold make run (s)", doc.get("cold_run_s"), "<= 300"),
        # the goal is on the runs' own trace since the raw reader: ring-buffer pages
        ("analyzer raw decode+analyze (ev/s)", doc.get("analyzer_raw_events_per_s"), ">= 1e6"),
        ("  text parse+analyze (events/s)", doc.get("analyzer_events_per_s"), "-"),
        ("  analyzer code", doc.get("analyzer_code"), "compiled"),
        ("analyzer peak RSS (MiB)", doc.get("analyzer_peak_rss_mib"), "bounded"),
        ("lost trace events", doc.get("lost_events"), "0"),
        ("  top lossless rate (async PFs/min)", doc.get("loss_top_async_pfs_per_min"), ">= 20,000"),
        ("  smallest lossless buffer (KB/CPU)", doc.get("loss_smallest_lossless_buffer_kb"), "-"),
        ("  first lossy buffer (KB/CPU)", doc.get("loss_first_lossy_buffer_kb"), "-"),
        ("observer overhead (on/off)", doc.get("observer_overhead_ratio"), "<= 1.05"),
        ("  text reader (text/off)", doc.get("observer_text_ratio"), "-"),
        ("  recording only (record/off)", doc.get("observer_record_ratio"), "-"),
        *_reader_rows(doc.get("reader_knee") or {}),
        ("guest boot, cold (s, median)", doc.get("boot_cold_s"), "-"),
        ("guest boot, restored (s, median)", doc.get("boot_restored_s"), "< cold"),
    ]
    lines = [f"{'measure':36s} {'value':>12s}   goal"]
    lines += [f"{name:36s} {value!s:>12s}   {goal}" for name, value, goal in rows]
    for phase, secs in (doc.get("phases_s") or {}).items():
        lines.append(f"  phase {phase:30s} {secs!s:>8s} s")
    return "\n".join(lines)


def _reader_rows(knee: dict[Any, dict[str, Any]]) -> list[tuple[str, Any, str]]:
    rows: list[tuple[str, Any, str]] = []
    for kb, k in knee.items():
        rows.append(
            (f"  L1 reader {kb} KB/CPU, lossless ev/s", k["top_lossless_events_per_s"], "-")
        )
        rows.append((f"  L1 reader {kb} KB/CPU, lossy ev/s", k["first_lossy_events_per_s"], "-"))
    return rows


def format_bench(result: dict[str, Any]) -> str:
    """A few human lines for ``apflab bench``."""
    unit = "bytes of ring-buffer pages" if result["format"] == "raw" else "lines"
    return (
        f"trace:   {result['trace']} ({result['lines']:,} {unit}, {result['events']:,} events)\n"
        f"parse:   {result['parse_events_per_s']:>10,} events/s  "
        f"(best of {result['repeat']}: {result['parse_s']} s)\n"
        f"analyze: {result['analyze_events_per_s']:>10,} events/s  parse+analyze "
        f"({result['analyze_s']} s); analysis alone "
        f"{result['analyze_only_events_per_s']:,} events/s\n"
        f"read:    {result['read_s']} s (file + decompression, not in the rates)\n"
        f"code:    {result['code']}\n"
        f"memory:  {result['peak_rss_mib']} MiB peak RSS of one analysis in a fresh process"
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.summarize is not None:
        root = calibrate.summarize(args.summarize.resolve(), emit)
        print(f"calibration: {root / 'summary.md'}, {root / 'detection.md'}")
        return EXIT_OK
    cells = calibrate.default_cells(args.delays, args.modes)
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in cells})
        if unknown:
            known = ", ".join(c.name for c in cells)
            raise UsageError(f"--only {', '.join(unknown)}: no such cell (cells: {known})")
        cells = [c for c in cells if c.name in args.only]
    root = calibrate.calibrate(cells, args.samples, args.results, emit)
    print(f"calibration: {root / 'summary.md'}")
    return EXIT_OK


def _positive_ints(what: str, *, empty: bool = False) -> Callable[[str], tuple[int, ...]]:
    """A parser of ``N,N,...`` (each > 0; none at all only when ``empty``) whose error
    names ``what`` they are."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in text.split(",") if x)
        except ValueError:
            values = None
        if values is None or (not values and not empty) or min(values, default=1) <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}")
        return values

    return parse


_sizes = _positive_ints("KB > 0")
_rates = _positive_ints("events/s > 0")
_delays = _positive_ints("µs > 0", empty=True)


def cmd_check_functional(args: argparse.Namespace) -> int:
    return check_functional(args.results, args.only, args.tags)


def register(sub: Any) -> None:
    b = sub.add_parser("bench", help="measure the analyzer (events/s) and print")
    b.add_argument("--trace", type=existing_trace, help="a trace file or a raw capture directory")
    b.add_argument(
        "--repeat", type=positive_int, default=perf.ANALYZER_REPEAT, help="timed passes (best kept)"
    )
    b.add_argument("--json", action="store_true")
    b.add_argument(
        "--full",
        action="store_true",
        help="everything make bench measures: a warm run, the tracer's overhead, the "
        "analyzer's rate and memory; writes RESULTS/bench.json",
    )
    b.add_argument(
        "--observer",
        action="store_true",
        help="only the tracer's overhead: workloads with tracing on (raw), as text, "
        "recording only and off, interleaved; writes RESULTS/observer.json",
    )
    b.add_argument(
        "--samples", type=positive_int, default=3, help="runs per side (--full, --observer)"
    )
    b.add_argument("--cold", action="store_true", help="also a cold make run (--full)")
    b.add_argument(
        "--knee-buffers",
        type=_sizes,
        default=perf.KNEE_BUFFERS_KB,
        metavar="KB,KB,...",
        help="per-CPU trace buffers of the loss sweep, largest first (--full)",
    )
    b.add_argument(
        "--trace-flood",
        type=_rates,
        metavar="RATE,RATE,...",
        help="the trace reader's loss knee here: trace_marker events/s into a real trace "
        "session, rising, per buffer size until one loses (run it in L1: apflab lab run)",
    )
    b.add_argument(
        "--flood-buffers",
        type=_sizes,
        default=(8192, 4),
        metavar="KB,KB,...",
        help="per-CPU trace buffers of --trace-flood",
    )
    b.add_argument("--flood-seconds", type=float, default=10.0, help="seconds of each flood")
    b.add_argument("--results", type=Path, default=Path("results"))
    b.set_defaults(func=cmd_bench)

    k = sub.add_parser(
        "calibrate", help="the calibration runs: kernels x samples in one lab, tabulated"
    )
    k.add_argument("--samples", type=positive_int, default=5)
    k.add_argument("--delays", type=_delays, default=calibrate.DELAYS_US, metavar="US,US,...")
    k.add_argument(
        "--modes",
        type=lambda t: [m for m in t.split(",") if m],
        default=list(calibrate.FAULT_MODES),
        metavar="MODE,...",
        help="apflab_ack= modes of the ack-faults kernel (empty: none)",
    )
    k.add_argument("--only", action="append", metavar="CELL", help="run only these cells")
    k.add_argument(
        "--summarize",
        type=Path,
        metavar="DIR",
        help="run nothing: judge the runs of calibration DIR again and rewrite its tables",
    )
    k.add_argument("--results", type=Path, default=Path("results"))
    k.set_defaults(func=cmd_calibrate)

    c = sub.add_parser("check-functional", help="the functional suite, on this host and in the lab")
    c.add_argument("--results", type=Path, default=Path("results"))
    c.add_argument(
        "--only",
        choices=["host", "kvm", "kernels"],
        default=None,
        help="one job; kernels: only build the controls' guest kernels",
    )
    c.add_argument("--tags", default=None, help="avocado tag filter for the host job")
    c.set_defaults(func=cmd_check_functional)
