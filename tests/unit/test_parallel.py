"""A night's cells in parallel on this machine (apflab.regress.parallel), without a lab:
the job's Avocado config and command, and the machine checks made before the night."""

import configparser
from pathlib import Path

import pytest

from apflab.cli.exitcodes import EXIT_USAGE
from apflab.cli.main import main
from apflab.errors import UsageError
from apflab.lab.session import LabSession
from apflab.regress import parallel, remote

MATRIX = Path(__file__).parents[1] / "functional" / "nightly.yaml"


def test_the_job_runs_n_tests_at_a_time_with_time_to_unwind() -> None:
    config = configparser.ConfigParser()
    config.read_string(parallel.avocado_config(2))
    assert config["run"]["max_parallel_tasks"] == "2"
    assert int(config["runner.task.interval"]["from_soft_to_hard_termination"]) >= 60


def test_the_job_is_the_apf_test_over_samples_then_the_matrix(tmp_path: Path) -> None:
    argv = parallel.avocado_argv(tmp_path / "a.conf", tmp_path / "r", tmp_path / "s.yaml", MATRIX)
    assert argv[1:3] == ["--config", str(tmp_path / "a.conf")]
    assert not any(a.startswith("--spawner") for a in argv)  # the process spawner, here
    assert argv[-4:] == [remote.TEST, "-m", str(tmp_path / "s.yaml"), str(MATRIX)]


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("APFLAB_RUNTIME", str(tmp_path / "runtime"))
    (tmp_path / "runtime").mkdir()
    monkeypatch.setattr(parallel.kvm, "probe", type("P", (), {"usable": False}))
    monkeypatch.setattr(parallel.paths, "in_lab", lambda: False)
    return tmp_path / "runtime"


def test_a_lab_that_is_up_is_refused(runtime: Path) -> None:
    LabSession.path().write_text("{}")
    with pytest.raises(UsageError, match=r"a lab is up .* `apflab lab down` first"):
        parallel.check_machine(2)


def test_labs_that_do_not_fit_are_refused(runtime: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel.procfs, "mem_available_mb", lambda: 5000)
    parallel.check_machine(1)  # one 3 GiB lab fits
    with pytest.raises(UsageError, match=r"--parallel 2: 2 labs need 6144 MB, .* 5000 MB"):
        parallel.check_machine(2)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--parallel", "0"], "'0' must be > 0"),
        (["--parallel", "2", "--hosts", str(MATRIX)], "--parallel and --hosts"),
    ],
)
def test_bad_parallel_options(
    extra: list[str], needle: str, runtime: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["nightly", "--matrix", str(MATRIX), *extra])
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    assert code == EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("apflab")]
    assert len(lines) == 1 and needle in lines[0], lines
