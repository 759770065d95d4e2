"""The functional suite's Avocado jobs, as check-functional builds them, against the
real Avocado of the venv: each must find its tests (a job whose arguments Avocado
cannot read runs nothing, and that must fail the suite, never pass it)."""

import subprocess
from pathlib import Path

import pytest

from apflab.suite import functional, perf

REPO = Path(__file__).resolve().parents[2]


def _dry_run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    i = argv.index("run") + 1
    return subprocess.run(
        [*argv[:i], "--dry-run", *argv[i:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("job", "expect"),
    [
        (functional.host_argv, "test_boot.py:"),
        (functional.verdicts_argv, "test_apf.py:AsyncPfVerdict.test_verdict;"),
        (functional.others_argv, "test_nightly.py:"),
    ],
)
def test_each_job_finds_its_tests(job, expect: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc = _dry_run(job(tmp_path / "job"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout, proc.stdout[-2000:]
    if job is functional.verdicts_argv:  # every control of controls.yaml is a variant
        for variant in ("stock", "unpatched", "no_ack", "no_kvmapf", "late_ack"):
            assert f"-control-{variant}-" in proc.stdout, variant
    if job is functional.host_argv:
        assert "test_apf.py" not in proc.stdout and "test_remote_night" not in proc.stdout


def test_a_job_that_runs_nothing_fails_the_suite(tmp_path: Path) -> None:
    failures: list[str] = []
    argv = functional._avocado(tmp_path / "job", ["tests/functional/test_apf.py"], ["-m"])
    assert functional._job(argv, tmp_path / "job", failures) == []
    assert len(failures) == 1 and "ran no test" in failures[0], failures


def test_the_background_kernel_build_is_a_command_of_the_cli() -> None:
    from apflab.cli.main import build_parser  # noqa: PLC0415

    args = build_parser().parse_args(list(functional._KERNELS_ONLY))
    assert args.only == "kernels"


def test_the_background_kernel_build_stops_with_the_suite(tmp_path: Path) -> None:
    """The suite's undo of its builder child: SIGTERM (a real child here)."""
    proc = subprocess.Popen(["sleep", "60"])
    functional.stop_kernel_builds(proc)
    assert proc.returncode == -15
    log = tmp_path / "kernels.log"
    log.write_text("== 3 guest kernel(s) ready in 0s\n")
    done = subprocess.Popen(["true"])
    functional.wait_kernel_builds(done, log, 0.0)
    assert done.returncode == 0


TRACES = Path(__file__).parent / "fixtures" / "traces"


def test_nth_ready_is_timed_from_the_workload_start() -> None:
    """record-1 (a real run read both ways: fixtures/traces/README.md): its 7,033
    page-readies came within the 40 s after its "workload start" marker."""
    raw = TRACES / "record-1" / "trace.raw"
    text = TRACES / "record-1" / "trace.txt.xz"
    first = perf.nth_ready_s(raw, 1)
    half = perf.nth_ready_s(raw, 3_500)
    last = perf.nth_ready_s(raw, 7_033)
    assert first is not None and half is not None and last is not None
    assert 0 <= first < half < last == 39.9
    assert perf.nth_ready_s(text, 3_500) == half  # the same events as text
    assert perf.nth_ready_s(raw, 7_034) is None  # fewer than asked
    # a trace without apflab's markers (tracefs text captured by hand): no start
    assert perf.nth_ready_s(TRACES / "stock-1-full.trace.xz", 10) is None
