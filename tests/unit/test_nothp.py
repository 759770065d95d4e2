"""apflab.vm.nothp really disables THP for the command it runs (read back from
the kernel in /proc/self/status), and reports a missing command in one line."""

import subprocess
import sys


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apflab.vm.nothp", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_child_has_thp_disabled() -> None:
    r = run("--", "grep", "THP_enabled", "/proc/self/status")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["THP_enabled:", "0"]


def test_missing_command_is_one_line() -> None:
    r = run("--", "/nonexistent/qemu")
    assert r.returncode == 127
    assert r.stderr.strip().count("\n") == 0
    assert "cannot run /nonexistent/qemu" in r.stderr
