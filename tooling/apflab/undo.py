"""The undo ledger: every host change registers its undo where it is made.

One LIFO stack per run.  Each entry is a small, serialisable :class:`Action`;
the stack is mirrored to a run-state record (JSON) under
:func:`apflab.paths.state_dir`, so that when a run is killed before it could
unwind (SIGKILL, power loss of the controlling terminal, a crashed test
runner), ``apflab cleanup`` can still undo exactly what that run changed.

Usage, the pattern every module follows::

    with UndoStack("run-1234") as undo:
        path = make_scratch_dir()
        undo.push(RemoveTree(str(path)))
        ...

Undo runs on normal exit, on exceptions (including the ones our SIGTERM/SIGINT
handlers raise) and on timeouts raised as exceptions.  Actions are idempotent:
undoing something already gone is fine.

Action kinds register themselves when their module is imported (a subclass
with a ``kind``): the generic ones live here, the host ones next to the code
that makes the change (:mod:`apflab.host.cgroup`, :mod:`apflab.host.swap`,
:mod:`apflab.host.tracefs`).  This module imports none of them: whoever
replays a record (``apflab cleanup``) imports the host package first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, ClassVar

from apflab import paths
from apflab.errors import ApflabError, HostError

log = logging.getLogger(__name__)

_KINDS: dict[str, type[Action]] = {}


class Action:
    """An undoable host change.  Subclasses are dataclasses of plain fields."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls

    def undo(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "kind")
        return f"{self.kind}({fields})"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = dataclasses.asdict(self)  # type: ignore[call-overload]
        data["kind"] = self.kind
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Action:
        kind = data.get("kind", "")
        cls = _KINDS.get(kind)
        if cls is None:
            known = ", ".join(sorted(_KINDS))
            raise HostError(
                f"unknown undo action kind {kind!r} in a run-state record (known: {known}); "
                "import the module that defines it (apflab.host.leftovers imports them all)"
            )
        fields = {k: v for k, v in data.items() if k != "kind"}
        return cls(**fields)


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start_time: int | None) -> bool:
    """True if ``pid`` still names the same, living process.

    Guards against pid reuse (``start_time``); a zombie (dead, not yet reaped
    by its parent) does not count as alive.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return False
    return start_time is None or int(fields[19]) == start_time


@dataclass
class KillProcess(Action):
    """Terminate a process we started: SIGTERM, wait ``grace_s``, SIGKILL."""

    kind: ClassVar[str] = "kill-process"
    pid: int
    start_time: int | None
    name: str = ""
    grace_s: float = 5.0

    def undo(self) -> None:
        if not pid_alive(self.pid, self.start_time):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if not _reap_or_alive(self.pid, self.start_time):
                return
            time.sleep(0.05)
        log.warning(
            "%s (pid %d) ignored SIGTERM for %.0fs: SIGKILL", self.name, self.pid, self.grace_s
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _reap_or_alive(self.pid, self.start_time):
            time.sleep(0.05)


def _reap_or_alive(pid: int, start_time: int | None) -> bool:
    """Reap ``pid`` if it is our zombie child; return whether it still exists."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    if not pid_alive(pid, start_time):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class RemoveTree(Action):
    """Remove a directory tree (or a file) we created."""

    kind: ClassVar[str] = "remove-tree"
    path: str

    def undo(self) -> None:
        p = Path(self.path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@dataclass
class RemoveEmptyDir(Action):
    """Remove a directory only if it is empty (shared parents such as the runtime root)."""

    kind: ClassVar[str] = "remove-empty-dir"
    path: str

    def undo(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise


class UndoStack:
    """A LIFO of :class:`Action` mirrored to a run-state record on disk."""

    def __init__(self, run_id: str, state_dir: Path | None = None, persist: bool = True) -> None:
        self.run_id = run_id
        self._actions: list[Action] = []
        self._state_dir = state_dir or paths.state_dir()
        self._record: Path | None = None
        self._persist = persist
        self._closed = False
        self._failed: list[Action] = []
        self._owner: tuple[int, int | None] = (os.getpid(), None)

    # -- recording ---------------------------------------------------------
    def push(self, action: Action) -> Action:
        """Register the undo of a change that was just made."""
        if self._closed:
            raise HostError(
                f"undo stack {self.run_id} is closed; cannot register {action.describe()}"
            )
        self._actions.append(action)
        log.debug("undo push: %s", action.describe())
        self._save()
        return action

    def adopt(self, pid: int) -> None:
        """Make ``pid`` the owner of this record (a lab left running on purpose):
        `apflab cleanup` leaves the record alone while that process lives."""
        self._owner = (pid, process_start_time(pid))
        self._save()
        self._actions = []  # this process no longer undoes them
        self._closed = True

    def callback(self, fn: Callable[[], None], what: str) -> None:
        """Register an in-process-only undo (not replayable by ``apflab cleanup``).

        Use only for things that die with the process anyway (open sockets).
        """
        self._actions.append(_Callback(fn, what))

    def _save(self) -> None:
        if not self._persist:
            return
        if self._record is None:
            self._state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._record = self._state_dir / f"{self.run_id}.json"
        pid, start = self._owner
        data = {
            "run_id": self.run_id,
            "pid": pid,
            "start_time": start if start is not None else process_start_time(pid),
            "actions": [a.to_dict() for a in self._actions if not isinstance(a, _Callback)],
        }
        tmp = self._record.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self._record)

    # -- undoing -----------------------------------------------------------
    def unwind_to(self, mark: int) -> None:
        """Undo the actions pushed since ``len(stack) == mark``, newest first.

        Lets a component (a guest, a lab) tear down its own part early while
        the rest of the run goes on.  Every action is tried; failures are
        collected and raised together as one :class:`HostError`.
        """
        failures: list[str] = []
        with _signals_deferred():
            while len(self._actions) > mark:
                action = self._actions.pop()
                try:
                    log.debug("undo: %s", action.describe())
                    action.undo()
                except Exception as err:  # keep undoing the rest, report all
                    log.error("undo failed: %s: %s", action.describe(), err)
                    failures.append(f"{action.describe()}: {err}")
                    self._failed.append(action)
                self._save()
        if failures:
            raise HostError(
                f"{len(failures)} undo action(s) failed for run {self.run_id}; "
                f"run `apflab cleanup` as root: " + "; ".join(failures)
            )

    def unwind(self) -> None:
        """Undo everything and, when all went well, delete the run-state record."""
        if self._closed and not self._actions:
            return  # adopted by another process, or already unwound
        try:
            self.unwind_to(0)
        finally:
            self._closed = True
            if self._failed:
                # keep what failed on record, so `apflab cleanup` can retry it
                self._actions = list(reversed(self._failed))
                self._save()
                self._actions = []
            elif self._record is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._record.unlink()
                _rmdir_if_empty(self._state_dir)
                _rmdir_if_empty(self._state_dir.parent)

    def __enter__(self) -> UndoStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.unwind()
        except ApflabError:
            if exc is None:
                raise
            log.exception("cleanup after an error also failed")

    def __len__(self) -> int:
        return len(self._actions)

    def describe(self) -> list[str]:
        return [a.describe() for a in self._actions]


@dataclass
class _Callback(Action):
    fn: Callable[[], None]
    what: str

    def undo(self) -> None:
        self.fn()

    def describe(self) -> str:
        return f"callback({self.what})"


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """While unwinding, a second Ctrl-C/SIGTERM must not abort the cleanup.

    Signals that arrive are remembered and re-delivered afterwards.
    """
    pending: list[int] = []  # signal numbers

    def remember(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)
        log.warning("signal %d received during cleanup: finishing cleanup first", signum)

    try:
        old = {s: signal.signal(s, remember) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be handled here anyway
        yield
        return
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum in pending[:1]:
            os.kill(os.getpid(), signum)


@dataclass(frozen=True)
class StaleRun:
    run_id: str
    record: Path
    owner_alive: bool
    actions: list[dict[str, Any]]


def list_runs(state_dir: Path | None = None) -> list[StaleRun]:
    """Every run-state record, with whether its owner process is still alive."""
    sdir = state_dir or paths.state_dir()
    runs = []
    for rec in sorted(sdir.glob("*.json")) if sdir.is_dir() else []:
        try:
            data = json.loads(rec.read_text())
        except (OSError, ValueError) as err:
            log.warning("unreadable run-state record %s: %s", rec, err)
            continue
        alive = pid_alive(int(data.get("pid", -1)), data.get("start_time"))
        runs.append(StaleRun(data.get("run_id", rec.stem), rec, alive, data.get("actions", [])))
    return runs


def cleanup_stale(
    state_dir: Path | None = None, include_alive: bool = False, only: str | None = None
) -> list[str]:
    """Undo the recorded changes of runs whose owner process is gone.

    :param include_alive: also undo runs whose owner is still running
    :param only: just this run id
    :return: one line per action undone (for the caller to print)
    """
    sdir = state_dir or paths.state_dir()
    done: list[str] = []
    for run in list_runs(sdir):
        if only is not None and run.run_id != only:
            continue
        if run.owner_alive and not include_alive:
            continue
        stack = UndoStack(run.run_id, sdir)
        stack._record = run.record
        for data in run.actions:
            stack._actions.append(Action.from_dict(data))
        done.extend(f"{run.run_id}: {d}" for d in reversed(stack.describe()))
        stack.unwind()
    return done
