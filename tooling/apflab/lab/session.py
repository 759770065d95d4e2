"""A lab that outlives one command: ``apflab lab up | run -- CMD | down | status``.

:func:`bring_up` boots L1 (see :mod:`apflab.lab.l1`), then hands the run-state
record to the L1 QEMU process (so ``apflab cleanup`` sees the lab as alive and
leaves it alone) and writes a session file with what :func:`run_command` needs
to reach it: the SSH port, the per-run client key (in the lab's 0700 run dir)
and the pinned host key.  :func:`tear_down` undoes that record: QEMU stopped,
run dir and session removed.  Printing is the command line's job
(:mod:`apflab.cli.lab`).
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from apflab import paths
from apflab.errors import LabError, UsageError
from apflab.lab.assets import L1_RESULTS
from apflab.lab.l1 import Lab, LabConfig, run_in_lab
from apflab.process import CmdResult
from apflab.retry import POLICIES, Retrier
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
    """How to reach a lab left running by :func:`bring_up`."""

    run_id: str
    pid: int
    start_time: int | None
    ssh_port: int
    client_key: str
    host_key: str
    log_dir: str
    #: L1's kernel: its release, and the sha256 of the bzImage when apflab built it
    kernel_release: str | None = None
    host_kernel_sha256: str | None = None

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


class AttachedLab:
    """An ``apflab lab up`` lab lent to one run: commands, files in and out; it stays
    up afterwards (only :func:`tear_down` stops it)."""

    def __init__(self, session: LabSession) -> None:
        self.session = session
        self.ssh = session.connect()

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 3600.0,
        on_output: Callable[[str, str], None] | None = None,
    ) -> CmdResult:
        return run_in_lab(
            self.ssh, argv, check=check, timeout=timeout, on_output=on_output, watch=self.alive
        )

    def alive(self) -> None:
        if not pid_alive(self.session.pid, self.session.start_time):
            raise LabError(f"the lab's QEMU (pid {self.session.pid}) is gone")

    def fetch(self, remote: str, local: Path) -> int:
        return self.ssh.get_tree(remote, local)

    def close(self) -> None:
        self.ssh.close()


def attach() -> AttachedLab | None:
    """The lab ``apflab lab up`` left running, if any (None: no lab is up)."""
    if not LabSession.path().is_file():
        return None
    return AttachedLab(LabSession.load())


def bring_up(
    config: LabConfig, log_dir: Path | None = None, host_kernel_sha256: str | None = None
) -> tuple[LabSession, Lab]:
    """Boot L1 (the ``lab`` retry policy) and leave it running after we exit.

    :param log_dir: where L1's logs go (default ``results/<lab run id>``)
    :param host_kernel_sha256: the sha256 of ``config.kernel`` (runs check it)
    """
    if LabSession.path().exists():
        raise UsageError("a lab is already up: `apflab lab down` first (or `apflab lab status`)")
    run_id = paths.new_run_id("lab")
    log_dir = (log_dir or Path("results") / run_id).resolve()
    undo = UndoStack(run_id)
    try:

        def boot(number: int) -> Lab:
            lab = Lab(config, log_dir if number == 1 else log_dir / f"attempt{number}", undo)
            try:
                lab.up()
            except BaseException:
                lab.down()
                raise
            return lab

        lab = Retrier(POLICIES["lab"], (LabError,)).run(boot)
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
            lab.facts.get("kernel"),
            host_kernel_sha256,
        )
        session.save()
        undo.push(RemoveTree(str(LabSession.path())))
        undo.adopt(vm.pid)
        vm.detach()
    except BaseException:
        undo.unwind()
        raise
    return session, lab


def run_command(
    cmd: Sequence[str], results: Path, stream: Callable[[str, str], None]
) -> tuple[int, list[tuple[str, Path, int]]]:
    """Run ``cmd`` in the lab, streaming its output; fetch the result dirs it made.

    :return: its exit status, and ``(L1 dir, local dir, files)`` per fetched dir
    """
    session = LabSession.load()
    fetched = []
    with session.connect() as ssh:
        before = _result_dirs(ssh)
        log.info("L1$ %s", shlex.join(cmd))
        result = run_in_lab(ssh, cmd, check=False, timeout=None, on_output=stream)
        after = _result_dirs(ssh)
        fresh = sorted(name for name, stamp in after.items() if before.get(name) != stamp)
        for name in fresh:
            dest = results / name
            n = ssh.get_tree(f"{L1_RESULTS}/{name}", dest)
            fetched.append((f"{L1_RESULTS}/{name}", dest, n))
    return result.exit_status, fetched


def _result_dirs(ssh: SSH) -> dict[str, str]:
    """Result dirs in L1 with their modification stamps."""
    out = ssh.run(
        [
            *("find", L1_RESULTS, "-mindepth", "1", "-maxdepth", "1", "-type", "d"),
            *("-printf", "%f %T@\\n"),
        ],
        check=False,
    ).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def tear_down() -> list[str] | None:
    """Stop the lab and undo everything it changed; None when no lab was up.

    :return: one line per undone action
    """
    p = LabSession.path()
    run_id = json.loads(p.read_text())["run_id"] if p.is_file() else None
    runs = [r.run_id for r in list_runs() if r.run_id.startswith("lab-")]
    if run_id is not None and run_id not in runs:
        p.unlink()
    if not runs:
        return None
    return [line for rid in runs for line in cleanup_stale(include_alive=True, only=rid)]
