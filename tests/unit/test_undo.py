"""The undo ledger with real processes, files and run-state records."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from apflab import undo as u
from apflab.errors import HostError, PreflightError
from apflab.host import swap


def test_lifo_order_and_record_removed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    order: list[str] = []
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.write_text("x")
    with u.UndoStack("t1", state) as stack:
        stack.push(u.RemoveTree(str(a)))
        stack.push(u.RemoveTree(str(b)))
        stack.callback(lambda: order.append("cb"), "note")
        record = state / "t1.json"
        data = json.loads(record.read_text())
        assert [x["kind"] for x in data["actions"]] == ["remove-tree", "remove-tree"]
    assert order == ["cb"]
    assert not a.exists() and not b.exists()
    assert not record.exists()
    assert not state.exists(), "an empty state dir is removed too"


def test_undo_runs_on_exception_and_keeps_going(tmp_path: Path) -> None:
    done = tmp_path / "done"
    done.mkdir()

    def boom() -> None:
        raise OSError("cannot")

    with pytest.raises(RuntimeError), u.UndoStack("t2", tmp_path / "s") as stack:
        stack.push(u.RemoveTree(str(done)))
        stack.callback(boom, "fails")
        raise RuntimeError("the run failed")
    assert not done.exists(), "the failing action must not stop the others"


def test_kill_process_never_signals_a_recycled_pid(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        # a record naming this pid but another process's start time: pid reuse
        u.KillProcess(proc.pid, start_time=1, name="recycled").undo()
        assert proc.poll() is None, "a process that merely reuses the pid was signalled"
    finally:
        proc.kill()
        proc.wait()


def test_remove_empty_dir_tolerates_a_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    u.RemoveEmptyDir(str(tmp_path)).undo()
    assert tmp_path.exists()


def test_kill_process_sigterm_then_reap(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    start = u.process_start_time(proc.pid)
    assert start is not None
    with u.UndoStack("t4", tmp_path / "s") as stack:
        stack.push(u.KillProcess(proc.pid, start, "sleep"))
    assert proc.poll() is not None
    assert not u.pid_alive(proc.pid, start)


def test_kill_process_escalates_to_sigkill(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 60"])
    deadline = time.monotonic() + 10  # the trap is set once sh has exec'd sleep
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline, "sh never exec'd sleep"
        time.sleep(0.02)
    start = u.process_start_time(proc.pid)
    t0 = time.monotonic()
    u.KillProcess(proc.pid, start, "stubborn", grace_s=0.5).undo()
    assert not u.pid_alive(proc.pid, start), "still alive after SIGKILL"
    assert "ignored SIGTERM" in caplog.text
    assert time.monotonic() - t0 < 5


def test_unwind_to_mark(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    drop = tmp_path / "drop"
    keep.mkdir()
    drop.mkdir()
    with u.UndoStack("t5", tmp_path / "s") as stack:
        stack.push(u.RemoveTree(str(keep)))
        mark = len(stack)
        stack.push(u.RemoveTree(str(drop)))
        stack.unwind_to(mark)
        assert keep.exists() and not drop.exists()
    assert not keep.exists()


def test_cleanup_stale_replays_a_dead_owners_record(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    victim = tmp_path / "left-behind"
    victim.mkdir()
    # a record written by a process that is gone
    record = {
        "run_id": "dead-run",
        "pid": 999_999_999,
        "start_time": 1,
        "actions": [{"kind": "remove-tree", "path": str(victim)}],
    }
    (state / "dead-run.json").write_text(json.dumps(record))
    runs = u.list_runs(state)
    assert [(r.run_id, r.owner_alive) for r in runs] == [("dead-run", False)]
    done = u.cleanup_stale(state)
    assert done == [f"dead-run: remove-tree(path={str(victim)!r})"]
    assert not victim.exists()
    assert not (state / "dead-run.json").exists()


def test_cleanup_leaves_live_runs_alone(tmp_path: Path) -> None:
    state = tmp_path / "s"
    victim = tmp_path / "in-use"
    victim.mkdir()
    stack = u.UndoStack("alive", state)
    stack.push(u.RemoveTree(str(victim)))
    assert u.cleanup_stale(state) == []
    assert victim.exists()
    stack.unwind()


def test_unknown_action_kind_is_an_error() -> None:
    with pytest.raises(HostError):
        u.Action.from_dict({"kind": "launch-missiles"})


def test_one_run_per_swap_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs in one lab want its swap disk: the second is refused at once, naming
    the first; once the first lets go, the device is free and no lock file is left."""
    monkeypatch.setattr(swap, "LOCK_DIR", tmp_path / "lock")
    device = tmp_path / "vdd"
    device.write_bytes(b"")
    first = u.UndoStack("run-first", persist=False)
    swap.lock_device(str(device), first)
    second = u.UndoStack("run-second", persist=False)
    with pytest.raises(
        PreflightError, match=r"in use by another apflab run \(pid \d+, run run-first\)"
    ):
        swap.lock_device(str(device), second)
    first.unwind()
    assert list((tmp_path / "lock").iterdir()) == []
    swap.lock_device(str(device), second)
    second.unwind()
