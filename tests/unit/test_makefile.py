"""``make check``'s early kernel builds: started before lint, stopped with make check.

The recipe runs for real, with its slow parts swapped out on make's command line: a
stand-in ``apflab`` that records its pid and sleeps (the kernel build), and a sub-make
that fails at once (lint failing) or waits for a signal (make check interrupted)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def fakes(tmp_path: Path) -> dict[str, str]:
    apflab = tmp_path / "apflab"
    apflab.write_text(
        "#!/bin/sh\n"
        f"echo $$ > {tmp_path}/builder.pid\n"
        f'echo "$@" > {tmp_path}/builder.argv\n'
        "exec sleep 60\n"
    )
    apflab.chmod(0o755)
    stamps = [tmp_path / "deps.stamp", tmp_path / "native.stamp"]
    for s in stamps:  # newer than every input: make runs neither deps nor native
        s.touch()
    return {
        "APFLAB": str(apflab),
        "STAMP": str(stamps[0]),
        "NATIVE_STAMP": str(stamps[1]),
        "RESULTS": str(tmp_path / "results"),
    }


def _make(fakes: dict[str, str], submake: str) -> subprocess.Popen[str]:
    args = [*(f"{k}={v}" for k, v in fakes.items()), f"SUBMAKE={submake}"]
    return subprocess.Popen(
        # SIGINT and SIGTERM as a terminal's make gets them: tests started in the
        # background (nohup ... &, some CI runners) ignore SIGINT, and so would make
        ["env", "--default-signal=INT,TERM", "make", "--no-print-directory", "check", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, which a signal may hit whole
    )


def _builder(tmp: Path) -> int:
    pid_file = tmp / "builder.pid"
    deadline = time.monotonic() + 10
    while not pid_file.is_file() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the early kernel build never started"
        time.sleep(0.05)
    return int(pid_file.read_text())


def test_a_failing_check_stops_the_early_build(fakes: dict[str, str], tmp_path: Path) -> None:
    proc = _make(fakes, "sleep 1; false")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0, out
    pid = _builder(tmp_path)
    assert (tmp_path / "builder.argv").read_text().split() == [
        "check-functional",
        "--only",
        "kernels",
    ]
    assert not _alive(pid), f"the kernel build (pid {pid}) outlived make check"
    assert "guest kernels build from now on at nice 19" in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_check_stops_the_early_build(
    fakes: dict[str, str], tmp_path: Path, sig: signal.Signals
) -> None:
    """The signal goes to make's process group, as a terminal's ^C or a CI runner's
    stop sends it.  A background job of a script ignores SIGINT, so there only the
    recipe's trap stops the build."""
    proc = _make(fakes, "sleep 30; :")
    pid = _builder(tmp_path)
    time.sleep(0.3)
    os.killpg(proc.pid, sig)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert not _alive(pid), f"the kernel build (pid {pid}) outlived make check"


def test_make_n_check_starts_nothing(fakes: dict[str, str], tmp_path: Path) -> None:
    args = [f"{k}={v}" for k, v in fakes.items()]
    out = subprocess.run(
        ["make", "-n", "check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "check-functional --only kernels" in out
    assert not (tmp_path / "builder.pid").exists()
    assert not (tmp_path / "results").exists()
