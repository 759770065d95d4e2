"""One night, its cells in parallel on this machine: N labs at once, Avocado's runner.

``apflab nightly --matrix FILE --parallel N`` (docs/scale.md, "Cells in parallel").
The night's cells x samples become the variants of one ``avocado run
--max-parallel-tasks N tests/functional/test_apf.py -m SAMPLES MATRIX`` with the
process spawner: each test is one ``apflab run`` with a nested lab of its own
(each L1 is one TCG thread, so two labs use both cores of a 2-core machine), or a
direct run on a KVM host.  The runs land in the test's output dirs and are laid out
and stored as the remote night does (:func:`apflab.regress.remote.collect_runs`).

A lab left up by ``apflab lab up`` would be shared by every test at once (one
tracefs, one swap disk): a parallel night refuses to start while one is up.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

from apflab import paths
from apflab.errors import UsageError
from apflab.host import kvm, procfs
from apflab.lab.l1 import LabConfig
from apflab.lab.session import LabSession
from apflab.regress import nightly, remote
from apflab.regress.remote import Emit
from apflab.regress.store import Store

#: Avocado's wait between SIGTERM and SIGKILL at a test's timeout (tests/avocado.conf):
#: the run unwinds its host changes in it
SOFT_TO_HARD_S = 60


def check_machine(parallel: int, lab: LabConfig | None = None) -> None:
    """N labs must fit here, and no lab may be up (every test would share it).

    :raises UsageError: one line naming ``--parallel`` and the fix
    """
    if LabSession.path().is_file():
        raise UsageError(
            "--parallel: a lab is up (`apflab lab up`), and every cell would share it: "
            "`apflab lab down` first, or drop --parallel"
        )
    if kvm.probe().usable or paths.in_lab():
        return  # direct runs: each sizes its own guest (apflab.run.dispatch.check_fits)
    need = parallel * (lab or LabConfig()).memory_mb
    avail = procfs.mem_available_mb()
    if need > avail:
        raise UsageError(
            f"--parallel {parallel}: {parallel} labs need {need} MB, this host has {avail} MB "
            "available: lower --parallel"
        )


def avocado_config(parallel: int) -> str:
    return (
        "[runner.task.interval]\n"
        f"from_soft_to_hard_termination = {SOFT_TO_HARD_S}\n\n"
        "[run]\n"
        f"max_parallel_tasks = {parallel}\n"
    )


def avocado_argv(config: Path, results: Path, samples: Path, matrix: Path) -> list[str]:
    """``avocado run`` of the apf test over samples x the matrix (process spawner)."""
    avocado = Path(sys.executable).parent / "avocado"
    return [
        str(avocado),
        "--config", str(config),
        "run",
        "--job-results-dir", str(results),
        "--disable-sysinfo",
        remote.TEST,
        "-m", str(samples), str(matrix.resolve()),
    ]  # fmt: skip


def checkout() -> Path:
    """The apflab checkout the job runs from (the apf test's relative path)."""
    repo = paths.repo_root()
    if repo is None:
        raise UsageError("--parallel runs the apf test of an apflab checkout: run from one")
    return repo


def run_parallel_night(
    matrix: Path,
    samples: int,
    parallel: int,
    store_url: str,
    results: Path,
    emit: Emit,
    night: str | None = None,
    baseline: str | None = None,
) -> nightly.Night:
    """:func:`apflab.regress.nightly.run_night`, ``parallel`` runs at a time."""
    cells, base = nightly.plan(matrix, emit, baseline)
    check_machine(parallel)
    repo = checkout()
    Store.open(store_url).close()  # a bad store URL fails now, not after the night
    name, root = nightly.night_root(results, night)
    job = root / "parallel"
    job.mkdir(parents=True)
    (job / "avocado.conf").write_text(avocado_config(parallel))
    (job / "samples.yaml").write_text(remote.samples_yaml(samples))
    t0 = time.monotonic()
    argv = avocado_argv(job / "avocado.conf", job / "avocado", job / "samples.yaml", matrix)
    status = remote.stream_avocado(argv, repo, emit)
    wall = time.monotonic() - t0
    job_dir = remote.latest_job(job / "avocado", status)
    # the runs are read from <hosts>/<host>/<test dirs>: this machine is the one host
    machines = job / "machines"
    machines.mkdir()
    (machines / socket.gethostname()).symlink_to(job_dir / "test-results")
    result = remote.store_night(
        name, root, machines, job_dir, matrix, job / "samples.yaml", store_url, cells, base
    )
    doc = {
        **result.to_dict(),
        "parallel": parallel,
        "wall_s": round(wall, 1),
        "avocado_exit": status,
    }
    (root / "night.json").write_text(json.dumps(doc, indent=1) + "\n")
    return result
