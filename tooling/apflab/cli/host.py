"""``apflab doctor | image | boot | cleanup``: the host, its images, one guest."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from apflab import undo
from apflab.cli.args import existing_file, positive_int
from apflab.cli.exitcodes import EXIT_FAIL, EXIT_OK
from apflab.host import leftovers
from apflab.host.doctor import host_facts, problems, report
from apflab.images.build import ensure
from apflab.images.recipe import cached, input_hash, load_recipe
from apflab.run.boot import BootRequest, boot, hold_until_interrupted
from apflab.vm.qemu import Guest


# -- doctor ------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    if args.json:
        doc = report()
        print(json.dumps(doc, indent=1))
        return EXIT_FAIL if doc["problems"] else EXIT_OK
    facts = host_facts()
    found = problems(facts)
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
    for p in found:
        print(f"PROBLEM:  {p.what} — fix: {p.fix}")
    print("ready: a run should work here" if not found else f"{len(found)} problem(s)")
    return EXIT_FAIL if found else EXIT_OK


# -- images ------------------------------------------------------------------
def cmd_image(args: argparse.Namespace) -> int:
    if args.action == "build":
        for name in args.names:
            t0 = time.monotonic()
            was_cached = cached(load_recipe(name)) is not None
            img = ensure(name)
            state = "cached" if was_cached else f"built in {time.monotonic() - t0:.0f}s"
            print(f"{name}: {img.directory} ({state}; kernel {img.manifest['kernel_release']})")
    elif args.action == "list":
        for name in args.names or ["guest", "lab"]:
            recipe = load_recipe(name)
            found = cached(recipe)
            where = f"cached at {found.directory}" if found else "not built"
            print(f"{name}: {where} (inputs {input_hash(recipe)[:16]})")
    return EXIT_OK


# -- boot --------------------------------------------------------------------
def cmd_boot(args: argparse.Namespace) -> int:
    request = BootRequest(
        image=args.image,
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        memory_mb=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        log_dir=args.log_dir,
    )

    def hold(vm: Guest) -> None:
        print(
            f"guest up: ssh -p {vm.ssh_port} -i {vm.client_key_path} root@127.0.0.1 "
            f"(Ctrl-C to stop)",
            flush=True,
        )
        hold_until_interrupted(vm)

    report = boot(request, hold if args.hold else None)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_boot(report)
    return EXIT_OK


def _print_boot(report: dict[str, Any]) -> None:
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
    print("latency:       not judged here — `apflab run` measures and judges page-ready latency")
    print(f"logs:          {report['log_dir']}")


# -- cleanup -----------------------------------------------------------------
def cmd_cleanup(args: argparse.Namespace) -> int:
    if args.check:
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


def register(sub: Any) -> None:
    d = sub.add_parser("doctor", help="what this host offers and which path apflab takes")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    i = sub.add_parser("image", help="build or list the cached guest and lab images")
    i.add_argument("action", choices=["build", "list"])
    i.add_argument("names", nargs="*", default=[])
    i.set_defaults(func=cmd_image)

    b = sub.add_parser("boot", help="boot the default guest and report what it found")
    b.add_argument("--image", default="guest")
    b.add_argument("--kernel", type=existing_file, help="boot this bzImage instead")
    b.add_argument("--initrd", type=existing_file)
    b.add_argument("--cmdline", default="", help="extra kernel command line")
    b.add_argument("--memory", type=positive_int, default=1024, metavar="MB")
    b.add_argument(
        "--cpus",
        type=positive_int,
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
