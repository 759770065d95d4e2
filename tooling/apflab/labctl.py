"""``apflab lab up | run -- CMD | down | status``: a lab that outlives one command.

``up`` boots L1 (see :mod:`apflab.lab`), then hands the run-state record to
the L1 QEMU process (so ``apflab cleanup`` sees the lab as alive and leaves it
alone) and writes a session file with what ``run`` needs to reach it: the SSH
port, the per-run client key (in the lab's 0700 run dir) and the pinned host
key.  ``down`` undoes that record: QEMU stopped, run dir and session removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from apflab import paths
from apflab.errors import UsageError
from apflab.lab import L1_RESULTS, Lab, LabConfig, run_in_lab
from apflab.undo import (
    RemoveTree,
    UndoStack,
    cleanup_stale,
    list_runs,
    pid_alive,
    process_start_time,
)
from apflab.vm import keys
from apflab.vm.ssh import SSH

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabSession:
    run_id: str
    pid: int
    start_time: int | None
    ssh_port: int
    client_key: str
    host_key: str
    log_dir: str

    @staticmethod
    def path() -> Path:
        return paths.runtime_root() / "lab-session.json"

    def save(self) -> None:
        p = self.path()
        p.write_text(json.dumps(asdict(self), indent=1))
        p.chmod(0o600)

    @classmethod
    def load(cls) -> LabSession:
        p = cls.path()
        if not p.is_file():
            raise UsageError("no lab is up: start one with `apflab lab up`")
        session = cls(**json.loads(p.read_text()))
        if not pid_alive(session.pid, session.start_time):
            raise UsageError(
                f"the lab's QEMU (pid {session.pid}) is gone: run `apflab lab down` to clean up"
            )
        return session

    def connect(self) -> SSH:
        ssh = SSH(
            "127.0.0.1",
            self.ssh_port,
            "root",
            keys.ClientKey(Path(self.client_key), "").load(),
            keys.parse_public_key(self.host_key),
            "L1",
        )
        ssh.connect(timeout=60)
        return ssh


def up(args: argparse.Namespace) -> int:
    if LabSession.path().exists():
        raise UsageError("a lab is already up: `apflab lab down` first (or `apflab lab status`)")
    run_id = paths.new_run_id("lab")
    log_dir = (args.log_dir or Path("results") / run_id).resolve()
    config = LabConfig(
        memory_mb=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        swap_mb=args.swap,
        kernels=tuple(args.kernel),
        detached=True,
    )
    undo = UndoStack(run_id)
    try:
        lab = Lab(config, log_dir, undo)
        lab.up()
        vm = lab.require_vm()
        assert vm.client_key_path is not None
        session = LabSession(
            run_id,
            vm.pid,
            process_start_time(vm.pid),
            vm.ssh_port,
            str(vm.client_key_path),
            vm.config.host_key,
            str(log_dir),
        )
        session.save()
        undo.push(RemoveTree(str(LabSession.path())))
        undo.adopt(vm.pid)
        vm.detach()
    except BaseException:
        undo.unwind()
        raise
    kvm = lab.facts.get("kvm", {})
    print(
        f"lab up: L1 pid {session.pid}, booted in {lab.timings['l1_boot']:.1f}s; "
        f"{kvm.get('reason')}; KVM_CAP_ASYNC_PF_INT={kvm.get('async_pf_int')}"
    )
    print(f"logs: {log_dir}")
    print("next: apflab lab run -- apflab doctor    |    apflab lab down")
    return 0


def run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("nothing to run: apflab lab run -- COMMAND [ARGS...]")
    session = LabSession.load()
    with session.connect() as ssh:
        before = _result_dirs(ssh)

        def stream(name: str, text: str) -> None:
            out = sys.stdout if name == "stdout" else sys.stderr
            out.write(text)
            out.flush()

        log.info("L1$ %s", shlex.join(cmd))
        result = run_in_lab(ssh, cmd, check=False, timeout=None, on_output=stream)
        after = _result_dirs(ssh)
        fresh = sorted(name for name, stamp in after.items() if before.get(name) != stamp)
        for name in fresh:
            dest = args.results / name
            n = ssh.get_tree(f"{L1_RESULTS}/{name}", dest)
            print(f"lab: fetched {n} file(s) of {L1_RESULTS}/{name} to {dest}", file=sys.stderr)
    return result.exit_status


def _result_dirs(ssh: SSH) -> dict[str, str]:
    """Result dirs in L1 with their modification stamps."""
    out = ssh.run(
        [
            "find",
            L1_RESULTS,
            "-mindepth",
            "1",
            "-maxdepth",
            "1",
            "-type",
            "d",
            "-printf",
            "%f %T@\\n",
        ],
        check=False,
    ).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def down(args: argparse.Namespace) -> int:
    p = LabSession.path()
    run_id = json.loads(p.read_text())["run_id"] if p.is_file() else None
    runs = [r.run_id for r in list_runs() if r.run_id.startswith("lab-")]
    if run_id is not None and run_id not in runs:
        p.unlink()
    if not runs:
        print("no lab is up")
        return 0
    for rid in runs:
        for line in cleanup_stale(include_alive=True, only=rid):
            print(f"undone: {line}")
    print("lab down")
    return 0


def status(args: argparse.Namespace) -> int:
    try:
        session = LabSession.load()
    except UsageError as err:
        print(err)
        return 1
    print(
        f"lab up: run {session.run_id}, L1 pid {session.pid}, ssh 127.0.0.1:{session.ssh_port}, "
        f"logs {session.log_dir}"
    )
    return 0


def main(args: argparse.Namespace) -> int:
    handlers = {"up": up, "run": run, "down": down, "status": status}
    return handlers[args.lab_command](args)
