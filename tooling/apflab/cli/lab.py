"""``apflab lab up | run -- CMD | down | status`` (see :mod:`apflab.lab.session`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from apflab import kernel
from apflab.cli.args import Parser, add_boot_option, existing_file, positive_int
from apflab.cli.exitcodes import EXIT_FAIL, EXIT_OK
from apflab.cli.output import emit_err
from apflab.errors import UsageError
from apflab.lab import session
from apflab.lab.l1 import LabConfig
from apflab.run.scenario import Scenario


def cmd_up(args: argparse.Namespace) -> int:
    host = Scenario(
        host_source=args.host_source,
        host_patch=tuple(args.host_patch),
        host_config=tuple(args.host_config),
    ).host_kernel_spec()
    built = kernel.build(host, progress=emit_err) if host is not None else None
    config = LabConfig(
        memory_mb=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        swap_mb=args.swap,
        kernels=tuple(args.kernel),
        detached=True,
        kernel=built.bzimage if built else None,
        boot=args.boot,
    )
    up, lab = session.bring_up(config, args.log_dir, built.sha256 if built else None)
    kvm = lab.facts.get("kvm", {})
    print(
        f"lab up: L1 pid {up.pid}, booted in {lab.timings['l1_boot']:.1f}s; "
        f"{kvm.get('reason')}; KVM_CAP_ASYNC_PF_INT={kvm.get('async_pf_int')}"
    )
    print(f"logs: {up.log_dir}")
    print("next: apflab lab run -- apflab doctor    |    apflab lab down")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("nothing to run: apflab lab run -- COMMAND [ARGS...]")

    def stream(name: str, text: str) -> None:
        out = sys.stdout if name == "stdout" else sys.stderr
        out.write(text)
        out.flush()

    status, fetched = session.run_command(cmd, args.results, stream)
    for remote, dest, n in fetched:
        print(f"lab: fetched {n} file(s) of {remote} to {dest}", file=sys.stderr)
    return status


def cmd_down(args: argparse.Namespace) -> int:
    undone = session.tear_down()
    if undone is None:
        print("no lab is up")
        return EXIT_OK
    for line in undone:
        print(f"undone: {line}")
    print("lab down")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    try:
        s = session.LabSession.load()
    except UsageError as err:
        print(err)
        return EXIT_FAIL
    print(f"lab up: run {s.run_id}, L1 pid {s.pid}, ssh 127.0.0.1:{s.ssh_port}, logs {s.log_dir}")
    return EXIT_OK


def register(sub: Any) -> None:
    lab = sub.add_parser("lab", help="the nested KVM lab: up | run -- CMD | down | status")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, parser_class=Parser)
    up = lab_sub.add_parser("up", help="boot L1 and leave it running")
    up.add_argument("--memory", type=positive_int, default=3072, metavar="MB")
    up.add_argument("--cpus", type=positive_int, default=1)
    up.add_argument("--swap", type=positive_int, default=2048, metavar="MB")
    up.add_argument("--accel", choices=["tcg", "kvm"], default="tcg")
    add_boot_option(up, "--boot")
    up.add_argument("--kernel", type=existing_file, action="append", default=[])
    up.add_argument("--host-source", default=None, help="build L1's kernel from this source")
    up.add_argument("--host-patch", type=existing_file, action="append", default=[])
    up.add_argument("--host-config", type=existing_file, action="append", default=[])
    up.add_argument("--log-dir", type=Path)
    up.set_defaults(func=cmd_up)
    lr = lab_sub.add_parser("run", help="run a command in L1, stream it, fetch results")
    lr.add_argument("--results", type=Path, default=Path("results"))
    lr.add_argument("cmd", nargs=argparse.REMAINDER)
    lr.set_defaults(func=cmd_run)
    lab_sub.add_parser("down", help="stop L1 and remove everything it used").set_defaults(
        func=cmd_down
    )
    lab_sub.add_parser("status", help="is a lab up?").set_defaults(func=cmd_status)
