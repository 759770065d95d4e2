"""Bad input gets a one-line error naming the thing and the fix, exit 4, within
seconds, and nothing on the host changes."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

import apflab as apflab_pkg
from apflab.cli import output
from apflab.cli import regress as cli_regress
from apflab.cli.exitcodes import EXIT_ERROR, EXIT_USAGE
from apflab.cli.main import main
from apflab.host import doctor, kvm, leftovers
from apflab.regress import store
from apflab.run.experiment import disk_full

F = Path(__file__).parent / "fixtures"
#: the real stock-1 trace cut after its first 20,000 bytes (an interrupted copy)
TRUNCATED = F / "traces" / "truncated-stock-1.trace.xz"
#: small hand-written bad inputs (README.md there)
BAD = F / "bad-input"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    before = leftovers.find()
    t0 = time.monotonic()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert took < 10, f"{argv} took {took:.1f}s to fail"
    assert leftovers.find() == before, "bad input changed the host"
    return code, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--kernel", "/nonexistent/bzImage"], "/nonexistent/bzImage does not exist"),
        (["run", "--pattern", "zigzag"], "'zigzag' is not one of seq, random, bursty"),
        (["run", "--limit", "0"], "'0' must be > 0"),
        (["run", "--limit", "50"], "below QEMU's own baseline"),
        (
            ["run", "--limit", "512", "--working-set", "100", "--procs", "3"],
            "raise the working set",
        ),
        (["run", "--working-set", "900", "--procs", "2"], "does not fit in the guest"),
        (["run", "--swap", "64"], "raise --swap"),
        (["run", "--deadline", "0"], "--deadline: '0' must be > 0"),
        (["analyze", "/nonexistent.trace"], "does not exist"),
        (["boot", "--image", "no-such-image"], "no image recipe 'no-such-image'"),
        (["lab", "run", "--", "true"], "no lab is up"),
        (["analyze", "/etc/passwd"], "no kvm async-PF trace event in its"),
        (["analyze", str(TRUNCATED)], "truncated or corrupt"),
        (["analyze", "/"], "neither a trace file nor a raw capture"),
        (["run", "--results", "/etc/passwd/x"], "--results /etc/passwd/x: cannot create it"),
        (["run", "--trace-buffer-kb", "99999999"], "do not fit in a quarter of"),
        (["run", "--swap-device", "/dev/nonexistent"], "does not exist: name a block device"),
        (["run", "--guest-memory", "999999"], "--guest-memory 999999 MB does not fit"),
        (["run", "--lab-memory", "99999999"], "--lab-memory 99999999 MB does not fit"),
        (["boot", "--memory", "999999999"], "--memory 999999999 MB does not fit"),
        (["run", "--limit", "abc"], "'abc' is not an integer"),
        (["run", "--procs", "0"], "'0' must be > 0"),
        (["run", "--rounds", "-1"], "'-1' must be >= 0"),
        (["run", "--guest-cpus", "0"], "'0' must be > 0"),
        (["run", "--seed", "x"], "'x' is not an integer"),
        (["run", "--boot", "warm"], "'warm' is not one of saved, cold"),
        (["run", "--kernel", str(BAD / "empty")], "is not an x86 bzImage (only 0 bytes"),
        (["run", "--kernel", "/etc/passwd"], "is not an x86 bzImage"),
        (["run", "--patch", "/etc/passwd"], "is not a unified or git diff"),
        (["kernel", "build", "--patch", "/etc/passwd"], "is not a unified or git diff"),
        (["run", "--kernel-config", "/etc/passwd"], "is not a config line"),
        (["run", "--kernel-config", str(BAD / "module.config")], "asks for a module"),
        (["run", "--thresholds", "/etc/passwd"], "not readable JSON"),
        (["run", "--thresholds", str(BAD / "thresholds-list.json")], "must hold a JSON object"),
        (["run", "--thresholds", str(BAD / "thresholds-type.json")], "must be a number >= 0"),
        (["analyze", "/bin/true"], "no kvm async-PF trace event"),
        (["judge", "/etc"], "not a run's results dir"),
        (["nightly", "--matrix", "/etc/passwd"], "not a yaml_to_mux variants file"),
        (["nightly", "--matrix", str(BAD / "matrix-bad-value.yaml")], "'abc' is not an integer"),
        (["calibrate", "--only", "nothing"], "--only nothing: no such cell (cells: unpatched"),
        (["calibrate", "--delays", "0,5"], "'0,5' is not a comma-separated list of µs > 0"),
        (["bench", "--trace-flood", ""], "'' is not a comma-separated list of events/s"),
    ],
)
def test_bad_input(
    argv: list[str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # a runtime root of its own: a lab another apflab left up on this machine is not ours
    monkeypatch.setenv("APFLAB_RUNTIME", str(tmp_path / "runtime"))
    code, err = run_cli(argv, capsys)
    assert code == EXIT_USAGE, err
    lines = [line for line in err.splitlines() if line.startswith("apflab")]
    assert len(lines) == 1, err
    assert needle in lines[0]


@pytest.mark.parametrize("command", [["run"], ["boot"], ["lab", "up"], ["cleanup"], ["calibrate"]])
def test_not_root(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who is not root is told so at once (the commands that only read files,
    such as analyze and judge, work for anyone)."""
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    code, err = run_cli(command, capsys)
    assert code == EXIT_USAGE
    assert f"`apflab {command[0]}` needs root" in err
    trace = F / "traces" / "stock-1-quirk.trace"
    assert main(["analyze", str(trace)]) == 0


def test_analyze_prints_the_contract_parts(capsys: pytest.CaptureFixture[str]) -> None:
    trace = Path(__file__).parent / "fixtures" / "traces" / "stock-1-quirk.trace"
    assert main(["analyze", "--json", str(trace)]) == 0
    out = capsys.readouterr().out
    for key in ('"events"', '"latency_us"', '"invariants"', '"not_present_to_ready"'):
        assert key in out


def test_analyze_reports_the_loss_its_trace_marks(capsys: pytest.CaptureFixture[str]) -> None:
    # a lab capture that lost events, without its run.json: the pages' own marks say so
    trace = Path(__file__).parent / "fixtures" / "traces" / "lossy-4k-1" / "trace.raw"
    assert main(["analyze", "--json", str(trace)]) == 0
    assert json.loads(capsys.readouterr().out)["events"]["lost"] == 856


def analyze_into(stdout: int | IO[str], runtime: Path) -> subprocess.CompletedProcess[str]:
    """``python -m apflab analyze`` of a small real trace, its stdout into ``stdout``
    and its runtime root (where a crash log would go) at ``runtime``."""
    trace = F / "traces" / "stock-1-quirk.trace"
    env = {
        **os.environ,
        "APFLAB_RUNTIME": str(runtime),
        "PYTHONPATH": str(Path(apflab_pkg.__file__).parents[1]),
    }
    return subprocess.run(
        [sys.executable, "-m", "apflab", "analyze", str(trace)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        check=False,
    )


def test_output_whose_reader_left_is_not_a_crash(tmp_path: Path) -> None:
    """``apflab analyze ... | head``: exit 141 (SIGPIPE), no crash log, nothing on stderr."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before apflab writes
    try:
        res = analyze_into(write, tmp_path)
    finally:
        os.close(write)
    assert res.returncode == 141, res.stderr
    assert res.stderr == ""
    assert not (tmp_path / "crashes").exists()


def test_output_to_a_full_device_is_one_line(tmp_path: Path) -> None:
    """``apflab analyze ... > /dev/full``: one line naming the full disk, exit 3, no
    crash log (it was an "unexpected OSError" with a traceback file)."""
    with open("/dev/full", "w") as full:
        res = analyze_into(full, tmp_path)
    assert res.returncode == EXIT_ERROR, res.stderr
    assert res.stderr.splitlines() == [
        "apflab: ERROR: No space left on device while writing the output (stdout or the "
        "results directory): free some space, or send them elsewhere"
    ]
    assert not (tmp_path / "crashes").exists()


def test_history_statistics_are_the_stores() -> None:
    """cli/regress.py keeps a copy (the store's module is heavy to import at start-up)."""
    assert cli_regress.STATISTICS == store.STATISTICS


def test_a_closed_output_never_stops_a_run() -> None:
    """The reader of a run's progress went away (a CI runner or harness that died, `|
    head`): the run goes on, and its lines are dropped (the run's own logs keep them)."""
    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "w") as stream:
        output._say("the workload ...", stream)  # EPIPE: redirected, not raised
        output._say("workload done", stream)
        stream.write("and a plain print after it\n")
        stream.flush()


def test_missing_tools_are_refused_before_anything_changes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A run whose tools are not installed (qemu, mkswap...): pre-flight, exit 4."""
    monkeypatch.setenv("APFLAB_RUNTIME", str(tmp_path / "runtime"))
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no tool at all
    code, err = run_cli(["run", "--accel", "tcg"], capsys)
    assert code == EXIT_USAGE, err
    assert "pre-flight: missing tools: qemu-system-x86_64, qemu-img, setpriv, mkswap" in err
    assert "make deps" in err


def test_too_little_disk_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """This machine's real free space against a need no disk meets."""
    monkeypatch.setenv("APFLAB_RUNTIME", str(tmp_path / "runtime"))
    monkeypatch.setitem(doctor.MIN_FREE_GB, "runtime", 1 << 40)
    code, err = run_cli(["run", "--accel", "tcg"], capsys)
    assert code == EXIT_USAGE, err
    assert f"GiB free under {tmp_path / 'runtime'}: free {1 << 40} GiB" in err


def test_kvm_here_on_a_host_whose_kvm_cannot_run_guests(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if kvm.probe().usable:
        pytest.skip("this host's KVM runs stock guests: nothing to refuse")
    monkeypatch.setenv("APFLAB_RUNTIME", str(tmp_path / "runtime"))
    code, err = run_cli(["run", "--here"], capsys)
    assert code == EXIT_USAGE, err
    assert "no usable KVM here" in err


def test_a_full_disk_is_named_not_a_bug(tmp_path: Path) -> None:
    """ENOSPC or EDQUOT while a run writes is the host's disk, said so (the run's
    one line and verdict reason), not "an unexpected OSError"; other errors are not."""
    for code in (errno.ENOSPC, errno.EDQUOT):
        said = disk_full(OSError(code, os.strerror(code)), tmp_path)
        assert said is not None
        assert str(tmp_path) in said
        assert os.strerror(code) in said
    assert disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert disk_full(KeyboardInterrupt(), tmp_path) is None
