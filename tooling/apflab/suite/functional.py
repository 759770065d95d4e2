"""``apflab check-functional``: the Avocado suite, in two jobs on this host.

* Job *host*: every test tagged neither ``kvm`` nor ``heavy`` (boot, interrupts
  and cleanup, the lab itself, cgroup v1 pressure, the report in a browser).  Tests
  that need something this host lacks CANCEL themselves with the reason.
* Job *kvm*: the verdicts (``test_apf.py`` with the variants of
  ``tests/functional/controls.yaml``: the stock kernel, the unpatched build and
  the negative controls), then the other ``kvm`` tests (a one-cell night).  Each
  goes through ``apflab run``, so on a host whose /dev/kvm cannot run stock guests
  it runs in the nested lab — one lab brought up for the whole job and used by
  every test (``apflab lab up``), not one L1 per test, and no Avocado inside the
  emulated L1.  The guest kernels of the controls are built here first, before the
  lab is up: at nice 19 beside the host job when both jobs run (``make check``
  starts them earlier still, beside lint, the unit tests and the images; these
  builders then wait on the kernel cache's lock).  When L1 itself fails during the
  job, the job runs again on a fresh L1 (the ``lab-suite`` retry policy); every
  failure is listed in the summary.

The merged verdict is strict: every test must PASS, none may FAIL, ERROR or be
INTERRUPTED, and a test that only CANCELed never ran, which fails the check (a
skipped check is never counted as a pass).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.errors import LabError, UsageError
from apflab.host import kvm
from apflab.lab import session
from apflab.lab.l1 import LabConfig
from apflab.retry import POLICIES, Retrier
from apflab.run import guest_kernel
from apflab.undo import pid_alive

log = logging.getLogger(__name__)

SUITE = "tests/functional"
CONFIG = "tests/avocado.conf"
CONTROLS = "tests/functional/controls.yaml"
VERDICTS = "tests/functional/test_apf.py"
BAD = {"FAIL", "ERROR", "INTERRUPTED", "WARN"}


#: a job's time limit: make check's jobs, and the heavy tiers' (check-heavy and the like
#: hold tests of up to 90 min each)
JOB_TIMEOUT_S = 3600
HEAVY_JOB_TIMEOUT_S = 4 * 3600


def _avocado(
    results_dir: Path,
    tests: Sequence[str],
    extra: Sequence[str] = (),
    timeout: int = JOB_TIMEOUT_S,
) -> list[str]:
    return [
        str(Path(sys.executable).with_name("avocado")),
        *("--config", CONFIG, "run", "--job-results-dir", str(results_dir)),
        *("--max-parallel-tasks", "1", "--job-timeout", str(timeout)),
        *extra,
        *tests,
    ]


def _load(results_dir: Path) -> list[dict[str, Any]]:
    latest = results_dir / "latest"
    job = latest.resolve() if latest.exists() else None
    if job is None or not (job / "results.json").exists():
        return []
    tests: list[dict[str, Any]] = json.loads((job / "results.json").read_text())["tests"]
    return tests


def _repo() -> Path:
    repo = paths.repo_root()
    if repo is None:
        raise UsageError("check-functional must run from an apflab checkout")
    return repo


def _job(argv: list[str], out: Path, failures: list[str]) -> list[dict[str, Any]]:
    """One Avocado job; a job that ran no test at all (a bad argument, a variants
    file it could not read) is a failure of the suite, never an empty pass."""
    print(f"== job: {' '.join(argv)}", flush=True)
    proc = subprocess.run(argv, cwd=_repo(), check=False, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)
    tests = _load(out)
    if not tests:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        failures.append(f"{out.name}: avocado exited {proc.returncode} and ran no test ({why})")
    return tests


def host_argv(out: Path, tags: str | None = None) -> list[str]:
    """Job *host*: every test but the ``kvm`` and ``heavy`` ones."""
    # "=": a filter such as -kvm would otherwise be read as an option
    filters = [f"--filter-by-tags={tags or '-kvm,-heavy'}", "--filter-by-tags-include-empty"]
    return _avocado(out, [SUITE], filters, JOB_TIMEOUT_S if tags is None else HEAVY_JOB_TIMEOUT_S)


def verdicts_argv(out: Path) -> list[str]:
    """Job *kvm*, first part: test_apf.py x controls.yaml."""
    # "=": --mux-yaml takes several files and would swallow the test as one
    return _avocado(out, [VERDICTS], [f"--mux-yaml={CONTROLS}"])


def others_argv(out: Path) -> list[str]:
    """Job *kvm*, second part: the other ``kvm`` tests but the heavy ones."""
    return _avocado(out, [SUITE], ["--filter-by-tags=kvm,-apf,-heavy"])


def run_host_job(out: Path, tags: str | None, failures: list[str]) -> list[dict[str, Any]]:
    return _job(host_argv(out, tags), out, failures)


def _kvm_tests(out: Path, failures: list[str]) -> list[dict[str, Any]]:
    """The verdicts, then the other ``kvm`` tests."""
    verdicts = _job(verdicts_argv(out / "verdicts"), out / "verdicts", failures)
    others = _job(others_argv(out / "others"), out / "others", failures)
    return verdicts + others


def prebuild_kernels(matrix: Path) -> None:
    """Build (or find cached) every guest kernel of the matrix's variants, one after
    another, before a lab is up: a kernel that does not build fails here, before any
    VM, and the tests' times are their own.  (Not faster: a cold debian-6.1 build took
    439 s here against 458 s beside the suite's idle L1, 2026-12-03.)"""
    from apflab.run.matrix import cells_of  # noqa: PLC0415 (imports Avocado)

    t0 = time.monotonic()
    # in the file's order: the unpatched build first, the patched ones grow from its tree
    specs = dict.fromkeys(
        s for c in cells_of(matrix) if (s := c.scenario.kernel_spec()) is not None
    )
    for spec in specs:
        built = guest_kernel.ensure_built(spec, lambda line: print(f"   {line}", flush=True))
        print(f"== kernel {built.key[:16]}: {built.how} ({built.build_seconds:.0f}s)", flush=True)
    print(f"== {len(specs)} guest kernel(s) ready in {time.monotonic() - t0:.0f}s", flush=True)


_KERNELS_ONLY = ("check-functional", "--only", "kernels")


def start_kernel_builds(log_path: Path) -> subprocess.Popen[bytes]:
    """:func:`prebuild_kernels` in a child at the lowest CPU priority, beside the host
    job: that job runs one TCG guest at a time and leaves most of a core to the build
    (a cold debian-6.1 build is 7-12 min of make check on a fresh machine).  The kvm
    job's own :func:`prebuild_kernels` then finds them cached (or builds what the child
    did not, in the foreground, where a failure shows)."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [*("nice", "-n", "19", sys.executable, "-m", "apflab"), *_KERNELS_ONLY],
            cwd=_repo(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def wait_kernel_builds(proc: subprocess.Popen[bytes], log_path: Path, t0: float) -> None:
    """Wait for :func:`start_kernel_builds`' child and say how it went."""
    rc = proc.wait()
    took = time.monotonic() - t0
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    print(f"== guest kernels beside the host job: exit {rc} after {took:.0f}s ({tail[0]})")
    print(f"   log: {log_path}", flush=True)


def stop_kernel_builds(proc: subprocess.Popen[bytes]) -> None:
    """The child's undo (the suite stopped early): SIGTERM, then SIGKILL; the kernel
    cache's own lock and temporary directories keep a half build out of the cache."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_kvm_job(out: Path, notes: list[str], failures: list[str]) -> list[dict[str, Any]]:
    """The kvm tests; through one lab kept up for the job when this host needs one."""
    if kvm.probe().usable or paths.in_lab():
        return _kvm_tests(out, failures)
    if session.attach() is not None:
        raise UsageError("a lab is up already: `apflab lab down` first (the suite brings its own)")
    prebuild_kernels(_repo() / CONTROLS)
    retrier = Retrier(POLICIES["lab-suite"], (LabError,))

    def attempt(number: int) -> list[dict[str, Any]]:
        job_dir = out if number == 1 else out.with_name(f"{out.name}-attempt{number}")
        up, lab = session.bring_up(LabConfig(), job_dir / "L1")
        print(f"== job kvm, lab {up.run_id} up in {lab.timings['l1_boot']:.1f}s", flush=True)
        mark = len(failures)
        try:
            results = _kvm_tests(job_dir, failures)
            alive = pid_alive(up.pid, up.start_time)
        finally:
            session.tear_down()
        if not alive:
            del failures[mark:]  # that attempt's: the job runs again
            raise LabError(f"L1 (pid {up.pid}) died during the job; see {job_dir / 'L1'}")
        return results

    def note(err: BaseException) -> None:
        notes.append(f"kvm job: {str(err).splitlines()[0]}; again on a fresh L1")
        print(f"== {notes[-1]}", flush=True)

    try:
        return retrier.run(attempt, between=note)
    except LabError as err:
        notes.append(f"kvm job: gave up after {retrier.failures} L1 failures: {err}")
        return []


def _short(name: str) -> str:
    i = name.find(SUITE)
    return name[i:] if i >= 0 else name


def merge(jobs: dict[str, list[dict[str, Any]]]) -> tuple[bool, list[str]]:
    """Combine the jobs' results; return (ok, report lines)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for job, tests in jobs.items():
        for t in tests:
            table.setdefault(_short(t["name"]), {})[job] = t
    ok = bool(table)
    lines = []
    for name in sorted(table):
        row = table[name]
        statuses = {j: row[j]["status"] for j in row}
        passed = any(s == "PASS" for s in statuses.values())
        bad = [j for j, s in statuses.items() if s in BAD]
        verdict = "ok" if passed and not bad else "FAILED"
        ok = ok and verdict == "ok"
        cells = "  ".join(f"{j}={s}" for j, s in statuses.items())
        lines.append(f"{verdict:6s} {name}  [{cells}]")
        for j, t in row.items():
            if t["status"] != "PASS":
                lines.append(f"         {j}: {t['status']}: {str(t.get('fail_reason', ''))[:300]}")
        if not passed and not bad:
            lines.append("         never ran: a cancelled test is not a pass")
    if not table:
        lines.append("no test results at all")
    return ok, lines


def check_functional(results: Path, only: str | None = None, tags: str | None = None) -> int:
    """Both jobs (or ``only`` one; ``"kernels"``: only the controls' guest kernels),
    their merged summary; 0 when the suite passed."""
    if only == "kernels":
        prebuild_kernels(_repo() / CONTROLS)
        return 0
    t0 = time.monotonic()
    root = results.resolve() / paths.new_run_id("check")
    root.mkdir(parents=True)
    jobs: dict[str, list[dict[str, Any]]] = {}
    notes: list[str] = []
    print(f"check-functional: results in {root}; {kvm.probe().reason}", flush=True)
    failures: list[str] = []
    builds = root / "kernels.log"
    builder = start_kernel_builds(builds) if only is None else None
    try:
        if only in (None, "host"):
            jobs["host"] = run_host_job(root / "host", tags, failures)
        if builder is not None:
            wait_kernel_builds(builder, builds, t0)
        if only in (None, "kvm"):
            jobs["kvm"] = run_kvm_job(root / "kvm", notes, failures)
    finally:
        if builder is not None:
            stop_kernel_builds(builder)
    ok, lines = merge(jobs)
    ok = ok and not failures
    lines += [f"FAILED job {f}" for f in failures]
    lines += [f"note: {n}" for n in notes]
    summary = "\n".join(lines)
    (root / "summary.txt").write_text(summary + "\n")
    print("\n== functional summary (every test must PASS; nothing may FAIL/ERROR)")
    print(summary)
    print(f"== {'PASSED' if ok else 'FAILED'} in {time.monotonic() - t0:.0f}s; results: {root}")
    return 0 if ok else 1
