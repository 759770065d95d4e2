"""``apflab compare``: candidate runs against a reference kernel's runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.cli.exitcodes import EXIT_FAIL, EXIT_INVALID, EXIT_OK
from apflab.regress import compare

COMPARE_EXIT = {compare.PASS: EXIT_OK, compare.FAIL: EXIT_FAIL, compare.INCONCLUSIVE: EXIT_INVALID}


def cmd_compare(args: argparse.Namespace) -> int:
    out = (args.out or Path("results") / paths.new_run_id("compare")).resolve()
    doc = compare.compare_dirs(args.candidates, args.baseline, out, compare.Rules(alpha=args.alpha))
    print(f"compare: {doc['verdict']} — {doc['reason']}")
    for c in doc["changes"]:
        print(f"  {c['metric']:26s} {c['statistic']:4s} {c['verdict']:12s} {c['why']}")
    print(f"report:  {doc['report']}")
    return COMPARE_EXIT[doc["verdict"]]


def register(sub: Any) -> None:
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
