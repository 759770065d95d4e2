"""The ``apflab`` command line.

Exit codes (also in README.md):

====  =====================================================================
0     success; for ``run``: verdict PASS
1     ``run``: verdict FAIL (the kernel broke the async-PF protocol or a bound)
2     ``run``: verdict INVALID (the evidence is incomplete: no verdict possible)
3     ERROR: an infrastructure fault (QEMU, lab, SSH, host change failed)
4     bad input or a failed pre-flight check: nothing on the host was changed
130   interrupted (SIGINT); 143: terminated (SIGTERM) — cleanup ran in both
====  =====================================================================
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from apflab import __version__
from apflab.errors import ApflabError, PreflightError, UsageError

log = logging.getLogger("apflab")

EXIT_OK, EXIT_FAIL, EXIT_INVALID, EXIT_ERROR, EXIT_USAGE = 0, 1, 2, 3, 4
VERDICT_EXIT = {"PASS": EXIT_OK, "FAIL": EXIT_FAIL, "INVALID": EXIT_INVALID, "ERROR": EXIT_ERROR}


class Terminated(BaseException):
    """Raised from the SIGTERM/SIGHUP handler so that every ``with`` block unwinds."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"apflab: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _existing_file(text: str) -> Path:
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text} does not exist or is not a file")
    return p.resolve()


# -- doctor ------------------------------------------------------------------
def host_facts() -> dict[str, Any]:
    """What this host offers, and which execution path apflab will take."""
    import shutil  # noqa: PLC0415

    from apflab import paths  # noqa: PLC0415
    from apflab.host import cgroup, kvm, tracefs  # noqa: PLC0415

    info = kvm.probe()
    facts: dict[str, Any] = {
        "apflab": __version__,
        "root": os.geteuid() == 0,
        "kernel": os.uname().release,
        "in_lab": paths.in_lab(),
        "kvm": {
            "flavour": info.flavour,
            "usable": info.usable,
            "reason": info.reason,
            "module": info.module,
            "async_pf_int": info.async_pf_int,
            "nested": info.nested,
        },
    }
    if info.usable:
        facts["path"] = "direct"
        facts["path_reason"] = f"{info.reason}: guests run here under KVM"
    else:
        facts["path"] = "lab"
        facts["path_reason"] = (
            f"{info.reason}; real KVM comes from the nested lab "
            "(L1 under TCG with -cpu EPYC,+svm running kvm_amd)"
        )
    try:
        cg = cgroup.detect()
        facts["cgroup"] = {"version": cg.version, "parent": str(cg.parent)}
    except PreflightError as err:
        facts["cgroup"] = {"error": str(err)}
    facts["tracefs"] = next(
        (str(p) for p in tracefs.TRACEFS_CANDIDATES if (p / "instances").is_dir()), None
    )
    facts["tools"] = {
        t: shutil.which(t) is not None
        for t in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs", "setpriv", "gcc")
    }
    return facts


def cmd_doctor(args: argparse.Namespace) -> int:
    facts = host_facts()
    if args.json:
        print(json.dumps(facts, indent=1))
        return EXIT_OK
    kvm = facts["kvm"]
    print(f"apflab {facts['apflab']} on Linux {facts['kernel']} (root: {facts['root']})")
    print(f"kvm:      {kvm['flavour']}: {kvm['reason']}")
    print(f"path:     {facts['path']} — {facts['path_reason']}")
    cg = facts["cgroup"]
    cg_line = f"v{cg['version']} under {cg['parent']}" if "version" in cg else cg["error"]
    print(f"cgroup:   {cg_line}")
    print(f"tracefs:  {facts['tracefs'] or 'not mounted (will be mounted when needed)'}")
    missing = [t for t, ok in facts["tools"].items() if not ok]
    tools = "all present" if not missing else f"missing {', '.join(missing)} (make deps)"
    print(f"tools:    {tools}")
    return EXIT_OK


# -- images ------------------------------------------------------------------
def cmd_image(args: argparse.Namespace) -> int:
    from apflab import images  # noqa: PLC0415

    if args.action == "build":
        for name in args.names:
            t0 = time.monotonic()
            was_cached = images.cached(images.load_recipe(name)) is not None
            img = images.ensure(name)
            state = "cached" if was_cached else f"built in {time.monotonic() - t0:.0f}s"
            print(f"{name}: {img.directory} ({state}; kernel {img.manifest['kernel_release']})")
    elif args.action == "list":
        for name in args.names or ["guest", "lab"]:
            recipe = images.load_recipe(name)
            found = images.cached(recipe)
            where = f"cached at {found.directory}" if found else "not built"
            print(f"{name}: {where} (inputs {images.input_hash(recipe)[:16]})")
    return EXIT_OK


# -- boot --------------------------------------------------------------------
def cmd_boot(args: argparse.Namespace) -> int:
    from apflab import guestinfo, images, paths  # noqa: PLC0415
    from apflab.undo import UndoStack  # noqa: PLC0415
    from apflab.vm.qemu import BootSpec, Guest, GuestConfig  # noqa: PLC0415

    img = images.ensure(args.image)
    boot = img.boot_spec(args.cmdline)
    if args.kernel is not None:
        boot = BootSpec(args.kernel, args.initrd or img.initrd, boot.cmdline)
    run_id = paths.new_run_id("boot")
    log_dir = (args.log_dir or Path("results") / run_id).resolve()
    cfg = GuestConfig(
        boot=boot,
        root=img.disk,
        host_key=img.host_key,
        name="guest",
        memory_mb=args.memory,
        cpus=args.cpus or paths.default_guest_cpus(),
        accel=args.accel,
    )
    report: dict[str, Any] = {"image": str(img.directory), "log_dir": str(log_dir)}
    log.info("boot run %s: logs in %s", run_id, log_dir)
    t0 = time.monotonic()
    with UndoStack(run_id) as undo, Guest(cfg, log_dir, undo) as vm:
        report["accel"] = vm.accel
        report["accel_reason"] = vm.accel_reason
        report["boot_seconds"] = round(vm.boot_seconds or 0.0, 1)
        report["qmp_status"] = vm.qmp.cmd("query-status")
        report["kernel"] = vm.run(["uname", "-r"]).stdout.strip()
        report["ssh"] = "ok"
        threads = vm.vcpu_threads()
        report["vcpu_threads"] = {str(k): v for k, v in threads.items()}
        report["vcpu_threads_in_qemu"] = all(
            Path(f"/proc/{vm.pid}/task/{tid}").exists() for tid in threads.values()
        )
        if vm.accel == "kvm":
            apf = guestinfo.apf_msrs(vm)
            report["async_pf"] = {
                "enabled": apf.enabled,
                "interrupt": apf.interrupt_delivery,
                "detail": apf.describe(),
                # QEMU's view: the CPUID bit that lets the guest enable interrupt delivery
                "qmp_kvm_asyncpf_int": vm.qmp.cmd(
                    "qom-get", path="/machine/unattached/device[0]", property="kvm-asyncpf-int"
                ),
            }
        if args.hold:
            print(
                f"guest up: ssh -p {vm.ssh_port} -i {vm.client_key_path} root@127.0.0.1 "
                f"(Ctrl-C to stop)",
                flush=True,
            )
            while True:
                time.sleep(1)
                vm.check_alive()
    report["total_seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"kernel:        {report['kernel']}")
        print(f"accelerator:   {report['accel_reason']}")
        print(f"boot:          SSH ready {report['boot_seconds']}s after launch")
        print(f"QMP status:    {report['qmp_status']['status']}")
        print("SSH:           ok (pinned host key, per-run ed25519 client key)")
        print(
            f"vCPU threads:  {report['vcpu_threads']} "
            f"(all threads of QEMU: {report['vcpu_threads_in_qemu']})"
        )
        if "async_pf" in report:
            print(f"async PF:      {report['async_pf']['detail']}")
        print(
            "latency:       not judged here — `apflab run` measures and judges page-ready latency"
        )
        print(f"logs:          {log_dir}")
    return EXIT_OK


# -- cleanup -----------------------------------------------------------------
def cmd_cleanup(args: argparse.Namespace) -> int:
    from apflab import undo  # noqa: PLC0415

    if args.check:
        from apflab import leftovers  # noqa: PLC0415

        found = leftovers.find()
        for line in found:
            print(f"left behind: {line}")
        print("host is clean" if not found else f"{len(found)} thing(s) of ours left behind")
        return EXIT_FAIL if found else EXIT_OK
    runs = undo.list_runs()
    if args.dry_run:
        for r in runs:
            state = "owner alive" if r.owner_alive else "owner gone"
            print(f"{r.run_id} ({state}): {len(r.actions)} action(s)")
            for a in reversed(r.actions):
                print(f"  {undo.Action.from_dict(a).describe()}")
        return EXIT_OK
    done = undo.cleanup_stale(include_alive=args.all)
    for line in done:
        print(f"undone: {line}")
    alive = [r for r in undo.list_runs() if r.owner_alive]
    for r in alive:
        print(f"left alone (still running): {r.run_id}; use --all to stop it too")
    if not done and not alive:
        print("nothing to clean up")
    return EXIT_OK


# -- lab ---------------------------------------------------------------------
def cmd_lab(args: argparse.Namespace) -> int:
    from apflab import labctl  # noqa: PLC0415

    return labctl.main(args)


# -- plumbing ----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="apflab", description="KVM async page fault integration tests")
    p.add_argument("--version", action="version", version=f"apflab {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("doctor", help="what this host offers and which path apflab takes")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    i = sub.add_parser("image", help="build or list the cached guest and lab images")
    i.add_argument("action", choices=["build", "list"])
    i.add_argument("names", nargs="*", default=[])
    i.set_defaults(func=cmd_image)

    b = sub.add_parser("boot", help="boot the default guest and report what it found")
    b.add_argument("--image", default="guest")
    b.add_argument("--kernel", type=_existing_file, help="boot this bzImage instead")
    b.add_argument("--initrd", type=_existing_file)
    b.add_argument("--cmdline", default="", help="extra kernel command line")
    b.add_argument("--memory", type=_positive_int, default=1024, metavar="MB")
    b.add_argument(
        "--cpus",
        type=_positive_int,
        default=None,
        help="default: 2 on a KVM host, 1 inside the nested lab",
    )
    b.add_argument("--accel", choices=["kvm", "tcg"], default=None)
    b.add_argument("--log-dir", type=Path)
    b.add_argument("--json", action="store_true")
    b.add_argument("--hold", action="store_true", help="keep the guest up until Ctrl-C")
    b.set_defaults(func=cmd_boot)

    c = sub.add_parser("cleanup", help="undo what killed runs left behind")
    c.add_argument("--all", action="store_true", help="also stop runs that are still alive")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument(
        "--check",
        action="store_true",
        help="change nothing; list anything of ours left on the host (exit 1 if any)",
    )
    c.set_defaults(func=cmd_cleanup)

    lab = sub.add_parser("lab", help="the nested KVM lab: up | run -- CMD | down | status")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, parser_class=_Parser)
    up = lab_sub.add_parser("up", help="boot L1 and leave it running")
    up.add_argument("--memory", type=_positive_int, default=3072, metavar="MB")
    up.add_argument("--cpus", type=_positive_int, default=1)
    up.add_argument("--swap", type=_positive_int, default=2048, metavar="MB")
    up.add_argument("--accel", choices=["tcg", "kvm"], default="tcg")
    up.add_argument("--kernel", type=_existing_file, action="append", default=[])
    up.add_argument("--log-dir", type=Path)
    lr = lab_sub.add_parser("run", help="run a command in L1, stream it, fetch results")
    lr.add_argument("--results", type=Path, default=Path("results"))
    lr.add_argument("cmd", nargs=argparse.REMAINDER)
    lab_sub.add_parser("down", help="stop L1 and remove everything it used")
    lab_sub.add_parser("status", help="is a lab up?")
    lab.set_defaults(func=cmd_lab)

    _register_late(sub)
    return p


def _register_late(sub: Any) -> None:
    """Commands whose modules are heavier (analysis, run, tests)."""
    from apflab import cli_run  # noqa: PLC0415

    cli_run.register(sub, _Parser, _positive_int, _existing_file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("paramiko", "qemu.qmp", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as err:
        print(f"apflab: {err}", file=sys.stderr)
        return EXIT_USAGE
    except PreflightError as err:
        print(f"apflab: pre-flight: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("apflab: interrupted; cleanup done", file=sys.stderr)
        return 130
    except Terminated as err:
        print(f"apflab: {err}; cleanup done", file=sys.stderr)
        return 128 + err.signum
    except ApflabError as err:
        log.debug("error", exc_info=True)
        print(f"apflab: ERROR: {err}", file=sys.stderr)
        return EXIT_ERROR


def shell_quote(argv: Sequence[str]) -> str:
    return shlex.join(argv)


if __name__ == "__main__":
    sys.exit(main())
