"""The guest workload: apflab-memtouch (guest_images/workload/) run over SSH.

It touches a working set with N processes for R rounds in a given access
pattern and prints one JSON line per (process, round).  The workload runs
under a deadline: a guest whose page-ready notifications stop (a lost ACK)
never finishes, and that must be observed, not waited for.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from apflab.errors import CommandError, SSHError, VMError
from apflab.process import CmdResult, Runner
from apflab.run.stall import Stalled

log = logging.getLogger(__name__)

PATTERNS = ("seq", "random", "bursty")
BINARY = "/usr/local/bin/apflab-memtouch"


@dataclass(frozen=True)
class WorkloadSpec:
    """What the guest does (built from :class:`apflab.run.scenario.Scenario`,
    which declares and checks each value).

    :ivar mb: working set per process, MiB
    :ivar procs: processes touching their own working sets in parallel
    :ivar rounds: passes over the working set after the first fill
    :ivar pattern: ``seq``, ``random`` or ``bursty`` (runs of 64 pages)
    :ivar pause_ms: sleep between rounds (lets the host swap the set out again)
    """

    mb: int
    procs: int
    rounds: int
    pattern: str
    pause_ms: int
    seed: int

    @property
    def total_mb(self) -> int:
        return self.mb * self.procs

    def argv(self) -> list[str]:
        return [
            BINARY,
            "--mb",
            str(self.mb),
            "--procs",
            str(self.procs),
            "--rounds",
            str(self.rounds),
            "--pattern",
            self.pattern,
            "--pause-ms",
            str(self.pause_ms),
            "--seed",
            str(self.seed),
        ]


@dataclass
class WorkloadResult:
    """How the workload ended.

    :ivar completed: every process finished every round (exit status 0)
    :ivar deadline_passed: it was still running when the deadline came
    :ivar stalled: it was stopped early: a page-ready stall was seen live
    """

    completed: bool
    deadline_passed: bool
    seconds: float
    exit_status: int | None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""
    error: str = ""
    #: stopped early because a token stayed outstanding past the stall bound
    stalled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkloadResult:
        return cls(**d)


def parse_rounds(stdout: str) -> list[dict[str, Any]]:
    """The per-round JSON lines printed by apflab-memtouch (others ignored)."""
    rounds = []
    for raw in stdout.splitlines():
        line = raw.strip()
        if line.startswith("{"):
            try:
                rounds.append(json.loads(line))
            except ValueError:
                continue
    return rounds


def run_workload(
    vm: Runner,
    spec: WorkloadSpec,
    deadline_s: float,
    watch: Callable[[], None] | None = None,
) -> WorkloadResult:
    """Run the workload; never raise for a deadline or a stall, report it instead.

    :param watch: called about once a second while the workload runs; it raises
        :class:`~apflab.run.stall.Stalled` to stop the workload early (the guest's
        page-readies stopped: waiting for the deadline would teach nothing more)
    """
    t0 = time.monotonic()
    try:
        kwargs = {} if watch is None else {"watch": watch}
        res = vm.run(spec.argv(), check=False, timeout=deadline_s, **kwargs)
    except Stalled as err:  # SSH channel closed, guest left as is
        return WorkloadResult(
            completed=False,
            deadline_passed=False,
            seconds=time.monotonic() - t0,
            exit_status=None,
            error=f"stopped: page-ready stall: {err}",
            stalled=True,
        )
    except CommandError as err:  # the deadline: SSH channel closed, guest left as is
        partial = err.result if isinstance(err.result, CmdResult) else None
        return WorkloadResult(
            completed=False,
            deadline_passed=True,
            seconds=time.monotonic() - t0,
            exit_status=None,
            rounds=parse_rounds(partial.stdout) if partial else [],
            stderr=partial.stderr if partial else "",
            error=f"still running after the {deadline_s:.0f}s deadline",
        )
    except (SSHError, VMError) as err:  # connection lost, or the guest stopped running
        return WorkloadResult(False, False, time.monotonic() - t0, None, error=str(err))
    return WorkloadResult(
        completed=res.exit_status == 0,
        deadline_passed=False,
        seconds=res.duration,
        exit_status=res.exit_status,
        rounds=parse_rounds(res.stdout),
        stderr=res.stderr[-4000:],
        error="" if res.exit_status == 0 else f"exited {res.exit_status}",
    )
