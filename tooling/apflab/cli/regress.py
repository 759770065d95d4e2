"""``apflab compare | nightly | history``: kernels against a reference, and over nights."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.cli.args import existing_file, positive_int
from apflab.cli.exitcodes import EXIT_FAIL, EXIT_INVALID, EXIT_OK
from apflab.cli.output import emit
from apflab.errors import UsageError

# The regress modules are imported in the commands that use them: they pull in
# scipy, SQLAlchemy and otava, which every other command (and every run inside the
# lab's emulated L1) would otherwise pay for at start-up.
COMPARE_EXIT = {"PASS": EXIT_OK, "FAIL": EXIT_FAIL, "INCONCLUSIVE": EXIT_INVALID}
STATISTICS = ("p10", "p50", "p90", "p99", "max")  # apflab.regress.store.STATISTICS


def cmd_compare(args: argparse.Namespace) -> int:
    from apflab.regress import compare  # noqa: PLC0415  (heavy: see the top)

    out = (args.out or Path("results") / paths.new_run_id("compare")).resolve()
    doc = compare.compare_dirs(args.candidates, args.baseline, out, compare.Rules(alpha=args.alpha))
    print(f"compare: {doc['verdict']} — {doc['reason']}")
    for c in doc["changes"]:
        print(f"  {c['metric']:26s} {c['statistic']:4s} {c['verdict']:12s} {c['why']}")
    print(f"report:  {doc['report']}")
    return COMPARE_EXIT[doc["verdict"]]


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=str(Path("results") / "apflab.db"),
        help="the results store: a SQLite file (default %(default)s) or a SQLAlchemy URL "
        "(postgresql+psycopg://user@host/db)",
    )


def cmd_nightly(args: argparse.Namespace) -> int:
    from apflab.regress import nightly  # noqa: PLC0415  (heavy: see the top)

    if args.hosts is not None and args.parallel is not None:
        raise UsageError(
            "--parallel and --hosts: a remote night runs one cell per host at a time; "
            "drop --parallel (or list more hosts)"
        )
    if args.hosts is not None:
        from apflab.regress import remote  # noqa: PLC0415

        result = remote.run_remote_night(
            args.matrix,
            args.samples,
            args.hosts,
            args.store,
            args.results,
            emit,
            args.night,
            args.baseline,
        )
    elif args.parallel is not None and args.parallel > 1:
        from apflab.regress import parallel  # noqa: PLC0415

        result = parallel.run_parallel_night(
            args.matrix,
            args.samples,
            args.parallel,
            args.store,
            args.results,
            emit,
            args.night,
            args.baseline,
        )
    else:
        result = nightly.run_night(
            args.matrix, args.samples, args.store, args.results, emit, args.night, args.baseline
        )
    write_trend(args.store, result.root)
    print(f"night {result.name}: {len(result.runs)} runs; results {result.root}")
    for f in result.findings:
        mark = "NEW " if f.first_night == result.name else ""
        print(f"  {mark}{f.kind}: {f.kernel}: {f.detail}")
    for cell, c in result.comparisons.items():
        print(f"  {cell} against the baseline: {c['verdict']} — {c['reason']}")
    print(f"trend:   {result.root / 'trend.html'} (xunit {result.root / 'trend.xml'})")
    return EXIT_FAIL if result.failed else EXIT_OK


def write_trend(store_url: str, out: Path) -> tuple[Path, Path]:
    from apflab.regress import changes  # noqa: PLC0415  (heavy: see the top)
    from apflab.regress.store import Store  # noqa: PLC0415
    from apflab.report import trend  # noqa: PLC0415

    with closing(Store.open(store_url)) as store:
        history = store.history()
        history99 = store.history(statistic="p99")
    found = [asdict(f) for f in changes.detect(history)]
    return trend.write(out, history, history99, found, changes.WATCHED)


def cmd_history(args: argparse.Namespace) -> int:
    from apflab.regress import compare  # noqa: PLC0415  (heavy: see the top)
    from apflab.regress.store import Store  # noqa: PLC0415

    with closing(Store.open(args.store)) as store:
        if args.import_dirs:
            added, known = store.import_dirs(compare.run_dirs(args.import_dirs), args.night)
            print(f"imported {added} run(s), {known} already stored", file=sys.stderr)
        rows = store.history(args.kernel, args.metric, args.statistic)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return EXIT_OK
    for r in rows:
        values = " ".join(f"{m}={v:.0f}" for m, v in sorted(r["metrics"].items()))
        night = r["night"] or "-"
        print(f"{r['started_at']} {night:12s} {r['kernel']:40s} {r['verdict']:8s} {values}")
    return EXIT_OK


def register(sub: Any) -> None:
    n = sub.add_parser(
        "nightly",
        help="kernels x scenarios x samples from a yaml_to_mux matrix: stored, compared, "
        "trend report (exit 1 on a new FAIL or regression)",
    )
    n.add_argument("--matrix", type=existing_file, required=True)
    n.add_argument("--samples", type=positive_int, default=5)
    n.add_argument("--night", default=None, help="the night's name (default: today, UTC)")
    n.add_argument(
        "--baseline",
        default=None,
        help="the matrix cell others are compared with (default: the first)",
    )
    n.add_argument(
        "--hosts",
        type=existing_file,
        default=None,
        help="spread the night over the KVM hosts of this JSON file (Avocado's remote "
        "spawner; docs/scale.md)",
    )
    n.add_argument(
        "--parallel",
        type=positive_int,
        default=None,
        metavar="N",
        help="run N cells at a time on this machine, each in a lab of its own (Avocado's "
        "runner; default: one after another in one lab; docs/scale.md)",
    )
    n.add_argument("--results", type=Path, default=Path("results"))
    _store_arg(n)
    n.set_defaults(func=cmd_nightly)

    h = sub.add_parser("history", help="query the results store (and import run dirs into it)")
    h.add_argument("--kernel", default=None)
    h.add_argument("--metric", default=None)
    h.add_argument("--statistic", default="p50", choices=STATISTICS)
    h.add_argument(
        "--import",
        dest="import_dirs",
        nargs="+",
        type=Path,
        default=None,
        metavar="DIR",
        help="store these run dirs (or dirs of them) first; idempotent",
    )
    h.add_argument("--night", default=None, help="the night name of imported runs")
    h.add_argument("--json", action="store_true")
    _store_arg(h)
    h.set_defaults(func=cmd_history)

    c = sub.add_parser(
        "compare",
        help="judge candidate runs against a reference kernel's runs on the same host "
        "(exit 0 PASS, 1 FAIL, 2 INCONCLUSIVE)",
    )
    c.add_argument("candidates", nargs="+", type=Path, metavar="CANDIDATE_RUN")
    c.add_argument(
        "--baseline",
        nargs="+",
        type=Path,
        required=True,
        metavar="BASELINE_RUN",
        help="run dirs of the reference kernel (or dirs holding them)",
    )
    c.add_argument("--alpha", type=float, default=0.05)
    c.add_argument("--out", type=Path, default=None, help="where compare.json/html go")
    c.set_defaults(func=cmd_compare)
