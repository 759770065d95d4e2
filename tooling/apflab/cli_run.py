"""``apflab run | analyze | bench | check-functional`` (see :mod:`apflab.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_INVALID, EXIT_ERROR, EXIT_USAGE = 0, 1, 2, 3, 4
VERDICT_EXIT = {"PASS": EXIT_OK, "FAIL": EXIT_FAIL, "INVALID": EXIT_INVALID, "ERROR": EXIT_ERROR}


def add_scenario_args(
    p: argparse.ArgumentParser, pos: Callable[[str], int], existing: Callable[[str], Path]
) -> None:
    from apflab.experiment import Scenario  # noqa: PLC0415

    d = Scenario()
    g = p.add_argument_group("scenario")
    g.add_argument("--kernel", type=existing, help="guest bzImage to judge (default: the image's)")
    g.add_argument("--initrd", type=existing, help="initrd for --kernel (default: the image's)")
    g.add_argument("--cmdline", default="", help="extra guest kernel command line")
    g.add_argument("--image", default=d.image)
    g.add_argument("--guest-memory", type=pos, default=d.guest_memory_mb, metavar="MB")
    g.add_argument(
        "--guest-cpus",
        type=pos,
        default=None,
        help="default: 2 on a KVM host, 1 inside the nested lab",
    )
    g.add_argument(
        "--limit",
        type=pos,
        default=d.pressure.limit_mb,
        metavar="MB",
        help="memory limit on the guest's QEMU (default %(default)s)",
    )
    g.add_argument(
        "--swap",
        type=pos,
        default=d.pressure.swap_mb,
        metavar="MB",
        help="swap file size when no swap disk is given (default %(default)s)",
    )
    g.add_argument("--swap-device", default=None, help="use this block device as swap")
    g.add_argument(
        "--guest-thp",
        choices=["auto", "on", "off"],
        default="auto",
        help="back guest RAM with transparent huge pages; auto: off under cgroup v1 "
        "(THP-backed QEMU was OOM-killed there), on under v2 (default %(default)s)",
    )
    g.add_argument(
        "--working-set",
        type=pos,
        default=d.workload.mb,
        metavar="MB",
        help="per process (default %(default)s)",
    )
    g.add_argument("--procs", type=pos, default=d.workload.procs)
    g.add_argument("--rounds", type=int, default=d.workload.rounds)
    g.add_argument("--pattern", choices=["seq", "random", "bursty"], default=d.workload.pattern)
    g.add_argument("--pause-ms", type=int, default=d.workload.pause_ms)
    g.add_argument("--seed", type=int, default=d.workload.seed)
    g.add_argument(
        "--deadline",
        type=float,
        default=d.deadline_s,
        metavar="S",
        help="workload deadline; passing it with page-readies outstanding is a FAIL",
    )
    g.add_argument("--trace-buffer-kb", type=pos, default=d.trace_buffer_kb)
    g.add_argument(
        "--accel",
        choices=["kvm", "tcg"],
        default=None,
        help="tcg: pressure machinery only, no async PF (never a PASS)",
    )


def scenario_from_args(args: argparse.Namespace) -> Any:

    from apflab import paths  # noqa: PLC0415
    from apflab.experiment import Scenario  # noqa: PLC0415
    from apflab.pressure import PressureSpec  # noqa: PLC0415
    from apflab.workload import WorkloadSpec  # noqa: PLC0415

    swap_device = args.swap_device or paths.lab_swap_device()
    return Scenario(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        image=args.image,
        guest_memory_mb=args.guest_memory,
        guest_cpus=args.guest_cpus,
        accel=args.accel,
        pressure=PressureSpec(
            limit_mb=args.limit,
            swap_mb=args.swap,
            swap_device=swap_device,
            guest_thp=None if args.guest_thp == "auto" else args.guest_thp == "on",
        ),
        workload=WorkloadSpec(
            mb=args.working_set,
            procs=args.procs,
            rounds=args.rounds,
            pattern=args.pattern,
            pause_ms=args.pause_ms,
            seed=args.seed,
        ),
        deadline_s=args.deadline,
        trace_buffer_kb=args.trace_buffer_kb,
    )


def _emit(line: str) -> None:
    print(line, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from apflab import runner  # noqa: PLC0415

    scenario = scenario_from_args(args)
    from apflab.lab import LabConfig  # noqa: PLC0415

    lab_config = LabConfig(memory_mb=args.lab_memory, cpus=args.lab_cpus)
    doc = runner.run(
        scenario,
        args.results.resolve(),
        _emit,
        run_id=args.run_id,
        here=args.here,
        lab_config=lab_config,
    )
    print_summary(doc, args.results.resolve())
    return VERDICT_EXIT.get(doc.get("verdict", "ERROR"), EXIT_ERROR)


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
    failed = [k for k, v in (doc.get("invariants") or {}).items() if not v.get("ok")]
    if failed:
        print(f"invariants failed: {', '.join(failed)}")
    print(f"report:  {out / 'report.html'}")
    print(f"verdict: {out / 'verdict.json'}")


def cmd_analyze(args: argparse.Namespace) -> int:
    from apflab.analysis import lifecycle, parse, verdict  # noqa: PLC0415

    vcpu_of_pid = None
    if args.vcpus:
        vcpu_of_pid = {
            int(tid): int(idx) for idx, tid in json.loads(args.vcpus.read_text()).items()
        }
    else:
        sidecar = args.trace.parent / "vcpus.json"
        if sidecar.exists():
            vcpu_of_pid = {
                int(tid): int(idx) for idx, tid in json.loads(sidecar.read_text()).items()
            }
    with parse.open_trace(args.trace) as f:
        analysis = lifecycle.analyze(parse.iter_events(f), vcpu_of_pid=vcpu_of_pid)
    lost = None
    run_json = args.trace.parent / "run.json"
    if run_json.exists():  # a results dir: the tracer's loss counters were recorded there
        lost = json.loads(run_json.read_text()).get("trace", {}).get("lost")
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


def cmd_bench(args: argparse.Namespace) -> int:
    from apflab import bench  # noqa: PLC0415

    trace = args.trace or bench.default_trace()
    result = bench.bench_analyzer(trace, args.repeat)
    print(json.dumps(result, indent=1) if args.json else bench.format_result(result))
    return EXIT_OK


def cmd_check_functional(args: argparse.Namespace) -> int:
    from apflab import checkrun  # noqa: PLC0415

    return checkrun.main(args)


def register(
    sub: Any,
    parser_class: type[argparse.ArgumentParser],
    pos: Callable[[str], int],
    existing: Callable[[str], Path],
) -> None:
    r = sub.add_parser(
        "run", help="a full async-PF latency verdict (exit 0 PASS, 1 FAIL, 2 INVALID, 3 ERROR)"
    )
    add_scenario_args(r, pos, existing)
    r.add_argument("--results", type=Path, default=Path("results"), help="results root")
    r.add_argument("--run-id", default=None)
    r.add_argument(
        "--here",
        action="store_true",
        help="run on this host even without usable KVM detection (used inside L1)",
    )
    lab = r.add_argument_group("lab (used only when this host needs the nested lab)")
    lab.add_argument("--lab-memory", type=pos, default=3072, metavar="MB")
    lab.add_argument("--lab-cpus", type=pos, default=1)
    r.set_defaults(func=cmd_run)

    a = sub.add_parser("analyze", help="re-analyse a saved trace (plain, .xz or .gz)")
    a.add_argument("trace", type=existing)
    a.add_argument("--vcpus", type=existing, help="vcpus.json: {cpu-index: thread-id}")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_analyze)

    b = sub.add_parser("bench", help="measure the analyzer (events/s) and print")
    b.add_argument("--trace", type=existing)
    b.add_argument("--repeat", type=pos, default=3)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("check-functional", help="the functional suite, on this host and in the lab")
    c.add_argument("--results", type=Path, default=Path("results"))
    c.add_argument("--only", choices=["host", "lab"], default=None)
    c.add_argument("--tags", default=None, help="avocado tag filter for both phases")
    c.set_defaults(func=cmd_check_functional)
    _ = sys, parser_class
