"""``apflab run | analyze``: one verdict, or a saved trace analysed again."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apflab.analysis import verdict
from apflab.analysis.analyzer import analyze_trace
from apflab.cli.args import add_boot_option, existing_file, existing_trace, positive_int
from apflab.cli.exitcodes import EXIT_FAIL, EXIT_OK, verdict_exit
from apflab.cli.output import emit
from apflab.errors import AnalysisError, UsageError
from apflab.lab.l1 import LabConfig
from apflab.run import dispatch
from apflab.run.judge import judge
from apflab.run.records import VCPUS_FILE, RunRecord, read_vcpus, vcpu_of_pid, write_json
from apflab.run.scenario import Option, Scenario


def _flag_type(opt: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return opt.convert(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = opt.name  # argparse names the type in some messages
    return convert


def add_scenario_args(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`Scenario` option, from its declaration."""
    g = p.add_argument_group("scenario")
    for opt in Scenario.options():
        shown = f" (default {opt.default})" if opt.default not in (None, "") else ""
        g.add_argument(
            opt.flag,
            dest=opt.name,
            type=_flag_type(opt),
            default=None if opt.repeat else opt.default,
            action="append" if opt.repeat else "store",
            choices=opt.choices or None,
            metavar=opt.unit or None,
            help=opt.help + ("" if opt.repeat else shown),
        )


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    values = {o.name: getattr(args, o.name) for o in Scenario.options()}
    for o in Scenario.options():
        if o.repeat:  # each flag converted by argparse already: one item each
            values[o.name] = tuple(item for items in values[o.name] or () for item in items)
    return Scenario(**values)


def cmd_run(args: argparse.Namespace) -> int:
    scenario = scenario_from_args(args)
    lab_config = LabConfig(memory_mb=args.lab_memory, cpus=args.lab_cpus, boot=args.lab_boot)
    results = args.results.resolve()
    try:
        results.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"--results {args.results}: cannot create it ({err.strerror}): pass a writable dir"
        ) from None
    doc = dispatch.run(
        scenario,
        results,
        emit,
        run_id=args.run_id,
        here=args.here,
        lab_config=lab_config,
        record_only=args.record_only,
    )
    if args.record_only:
        print(f"recorded: {doc['recorded']} (not judged here)")
        return EXIT_OK
    print_summary(doc, results)
    code = verdict_exit(doc.get("verdict"))
    if args.baseline:
        from apflab.regress import compare  # noqa: PLC0415  (scipy: only when asked)

        run_dir = results / str(doc["run_id"])
        cmp = compare.compare_dirs([run_dir], args.baseline, run_dir, compare.Rules())
        doc["comparison"] = {k: cmp[k] for k in ("verdict", "reason", "report", "changes")}
        write_json(run_dir / "verdict.json", doc)
        print(f"against the baseline: {cmp['verdict']} — {cmp['reason']} ({cmp['report']})")
        if cmp["verdict"] == "FAIL":
            code = EXIT_FAIL
    return code


def print_summary(doc: dict[str, Any], results_root: Path) -> None:
    out = results_root / str(doc.get("run_id", "latest"))
    print()
    print(f"verdict: {doc.get('verdict')} — {doc.get('reason')}")
    ev = doc.get("events") or {}
    if ev:
        print("events:  " + ", ".join(f"{k} {v}" for k, v in ev.items()))
    for metric, s in (doc.get("latency_us") or {}).items():
        if s and s.get("count"):
            print(
                f"  {metric:22s} n={s['count']:<7} p50 {s['p50']} us  p90 {s['p90']} us  "
                f"p99 {s['p99']} us  p99.9 {s['p999']} us  max {s['max']} us"
            )
    invariants = (doc.get("invariants") or {}).items()
    failed = [k for k, v in invariants if not v["ok"] and v.get("evaluated", True)]
    if failed:
        print(f"invariants failed: {', '.join(failed)}")
    print(f"report:  {out / 'report.html'}")
    print(f"verdict: {out / 'verdict.json'}")


def cmd_analyze(args: argparse.Namespace) -> int:
    vcpus_file = args.vcpus or args.trace.parent / VCPUS_FILE
    vcpus = vcpu_of_pid(read_vcpus(vcpus_file)) if vcpus_file.is_file() else None
    try:
        analysis, stats = analyze_trace(args.trace, vcpus)
    except AnalysisError as err:  # the user's file: bad input, not a fault of ours
        raise UsageError(str(err)) from err
    if stats.events == 0:
        raise UsageError(
            f"{args.trace}: no kvm async-PF trace event in its {stats.lines} lines: pass a "
            "trace apflab captured (results/<run>/trace.raw or trace.txt.xz) or tracefs text"
        )
    lost = None
    run_json = args.trace.parent / "run.json"
    if run_json.exists():  # a results dir: the tracer's loss counters were recorded there
        lost = json.loads(run_json.read_text()).get("trace", {}).get("lost")
    if stats.lost_marks:  # the trace itself says it lost some
        lost = max(lost or 0, stats.lost_at_least())
    doc = verdict.analysis_document(analysis, lost)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print("events:  " + ", ".join(f"{k} {v}" for k, v in doc["events"].items()))
        for metric, s in doc["latency_us"].items():
            print(f"  {metric:22s} {json.dumps(s)}")
        for name, inv in doc["invariants"].items():
            print(f"  {'ok ' if inv['ok'] else 'BAD'} {name}: {inv['detail']}")
    return EXIT_OK


def cmd_judge(args: argparse.Namespace) -> int:
    try:
        rec = RunRecord.load(args.results_dir.resolve())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(
            f"{args.results_dir}: not a run's results dir apflab can read (run.json: {err})"
        ) from None
    doc = judge(rec)
    print_summary(doc, rec.results.parent)
    return verdict_exit(doc.get("verdict"))


def register(sub: Any) -> None:
    r = sub.add_parser(
        "run", help="a full async-PF latency verdict (exit 0 PASS, 1 FAIL, 2 INVALID, 3 ERROR)"
    )
    add_scenario_args(r)
    r.add_argument("--results", type=Path, default=Path("results"), help="results root")
    r.add_argument("--run-id", default=None)
    r.add_argument(
        "--here",
        action="store_true",
        help="run on this host even without usable KVM detection",
    )
    r.add_argument(
        "--record-only",
        action="store_true",
        help="run here, write run.json and the trace, do not judge (the lab's inner run: "
        "the outer host judges)",
    )
    r.add_argument(
        "--baseline",
        nargs="+",
        type=Path,
        default=None,
        metavar="DIR",
        help="runs of a reference kernel on this host (run dirs, or dirs of them): the "
        "run is also compared with them (apflab compare)",
    )
    lab = r.add_argument_group("lab (used only when this host needs the nested lab)")
    lab.add_argument("--lab-memory", type=positive_int, default=3072, metavar="MB")
    lab.add_argument("--lab-cpus", type=positive_int, default=1)
    add_boot_option(lab, "--lab-boot")
    r.set_defaults(func=cmd_run)

    j = sub.add_parser(
        "judge", help="judge a run's results dir again with today's rules (rewrites its verdict)"
    )
    j.add_argument("results_dir", type=Path)
    j.set_defaults(func=cmd_judge)

    a = sub.add_parser(
        "analyze", help="re-analyse a saved trace (plain, .xz or .gz, or a raw capture directory)"
    )
    a.add_argument("trace", type=existing_trace)
    a.add_argument("--vcpus", type=existing_file, help="vcpus.json: {cpu-index: thread-id}")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_analyze)
