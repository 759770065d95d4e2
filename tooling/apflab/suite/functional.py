"""``apflab check-functional``: the Avocado suite, wherever each test can run.

Phase *host* runs ``avocado run tests/functional`` on this host.  Tests that
need something this host lacks (real KVM, cgroup v2...) CANCEL themselves
with the reason.  When /dev/kvm here cannot run stock guests, phase *lab*
brings up the nested lab and runs the same suite inside L1, where real KVM
is; its xunit/json results and logs are copied back to the host.

The merged verdict is strict: a test must PASS in at least one phase, and no
phase may FAIL, ERROR or be INTERRUPTED.  A test cancelled everywhere never
ran, and that fails the check (a skipped check is never counted as a pass).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.errors import LabError, SSHError, UsageError, VMError
from apflab.host import kvm
from apflab.lab.assets import ASSETS_MOUNT, L1_RESULTS
from apflab.lab.l1 import Lab, LabConfig
from apflab.retry import POLICIES, Retrier
from apflab.undo import UndoStack

log = logging.getLogger(__name__)

SUITE = "tests/functional"
CONFIG = "tests/avocado.conf"
BAD = {"FAIL", "ERROR", "INTERRUPTED", "WARN"}


def _avocado_argv(results_dir: str, tags: str | None) -> list[str]:
    argv = [
        "avocado",
        "--config",
        CONFIG,
        "run",
        "--job-results-dir",
        results_dir,
        "--max-parallel-tasks",
        "1",
        "--job-timeout",
        "2400",
        SUITE,
    ]
    if tags:
        argv += ["--filter-by-tags", tags, "--filter-by-tags-include-empty"]
    return argv


def _latest_job(results_dir: Path) -> Path | None:
    latest = results_dir / "latest"
    return latest.resolve() if latest.exists() else None


def _load(job: Path | None) -> list[dict[str, Any]]:
    if job is None or not (job / "results.json").exists():
        return []
    tests: list[dict[str, Any]] = json.loads((job / "results.json").read_text())["tests"]
    return tests


def run_host_phase(out: Path, tags: str | None) -> list[dict[str, Any]]:
    repo = paths.repo_root()
    if repo is None:
        raise UsageError("check-functional must run from an apflab checkout")
    avocado = Path(sys.executable).with_name("avocado")
    argv = _avocado_argv(str(out), tags)
    argv[0] = str(avocado)
    print(f"== phase host: {' '.join(argv)}", flush=True)
    subprocess.run(argv, cwd=repo, check=False)
    return _load(_latest_job(out))


def run_lab_phase(out: Path, tags: str | None, notes: list[str]) -> list[dict[str, Any]]:
    """The suite inside L1, one Avocado job per test file.

    L1 under TCG is known to panic now and then ("BUG: TASK stack guard page was
    hit ... Comm: CPU n/KVM", shared/lab-notes.md section 2); that says nothing
    about apflab.  When it happens, a fresh L1 is brought up and the interrupted
    file runs again, under the ``lab-suite`` retry policy (:mod:`apflab.retry`);
    every failure is printed and listed in the summary.  Tests never retry
    their own failures.
    """
    repo = paths.repo_root()
    assert repo is not None
    files = sorted(p.relative_to(repo).as_posix() for p in (repo / SUITE).glob("test_*.py"))
    results: list[dict[str, Any]] = []
    retrier = Retrier(POLICIES["lab-suite"], (LabError, VMError, SSHError))
    print("== phase lab: nested KVM lab, then the suite inside L1", flush=True)
    with UndoStack(paths.new_run_id("check-lab")) as undo:
        labs = _Labs(out, undo)
        try:
            for i, job in enumerate(files):

                def one(number: int, job: str = job) -> list[dict[str, Any]]:
                    return _lab_job(labs.get(), job, out, tags)

                def note(err: BaseException, job: str = job) -> None:
                    line = str(err).splitlines()[0]
                    notes.append(f"L1 #{labs.boots} failed during {job}: {line}")
                    print(f"== {notes[-1]}", flush=True)
                    labs.drop()

                try:
                    results += retrier.run(one, between=note)
                except (LabError, VMError, SSHError) as err:
                    note(err)
                    notes.append(
                        f"gave up after {retrier.failures} L1 failures; not run: {files[i:]}"
                    )
                    break
        finally:
            labs.drop()
    return results


class _Labs:
    """The current L1 of the lab phase, booted when first needed."""

    def __init__(self, out: Path, undo: UndoStack) -> None:
        self.out, self.undo = out, undo
        self.lab: Lab | None = None
        self.boots = 0

    def get(self) -> Lab:
        if self.lab is None:
            self.boots += 1
            lab = Lab(LabConfig(), self.out / f"L1-{self.boots}", self.undo)
            self.lab = lab
            lab.up()
            reason = lab.facts["kvm"]["reason"]
            print(f"   L1 #{self.boots} up in {lab.timings['l1_boot']:.1f}s: {reason}", flush=True)
        return self.lab

    def drop(self) -> None:
        if self.lab is not None:
            self.lab.down()
            self.lab = None


def _lab_job(lab: Lab, job: str, out: Path, tags: str | None) -> list[dict[str, Any]]:
    stem = Path(job).stem
    remote = f"{L1_RESULTS}/avocado-{stem}"
    argv = ["env", "-C", f"{ASSETS_MOUNT}/src", *_avocado_argv(remote, tags)]
    argv[argv.index(SUITE)] = job

    def stream(name: str, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    lab.run(argv, check=False, timeout=3000, on_output=stream)
    local = out / stem
    lab.fetch(remote, local)
    return _load(_latest_job(local))


def _short(name: str) -> str:
    i = name.find(SUITE)
    return name[i:] if i >= 0 else name


def merge(phases: dict[str, list[dict[str, Any]]]) -> tuple[bool, list[str]]:
    """Combine the phases' results; return (ok, report lines)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for phase, tests in phases.items():
        for t in tests:
            table.setdefault(_short(t["name"]), {})[phase] = t
    ok = bool(table)
    lines = []
    for name in sorted(table):
        row = table[name]
        statuses = {p: row[p]["status"] for p in row}
        passed = any(s == "PASS" for s in statuses.values())
        bad = [p for p, s in statuses.items() if s in BAD]
        verdict = "ok" if passed and not bad else "FAILED"
        if verdict != "ok":
            ok = False
        cells = "  ".join(f"{p}={statuses.get(p, '-')}" for p in phases)
        lines.append(f"{verdict:6s} {name}  [{cells}]")
        for p, t in row.items():
            if t["status"] != "PASS":
                lines.append(f"         {p}: {t['status']}: {str(t.get('fail_reason', ''))[:300]}")
        if not passed and not bad:
            lines.append("         never ran anywhere: a cancelled test is not a pass")
    if not table:
        lines.append("no test results at all")
    return ok, lines


def check_functional(results: Path, only: str | None = None, tags: str | None = None) -> int:
    """Both phases (or ``only`` one), their merged summary; 0 when the suite passed."""
    t0 = time.monotonic()
    root = results.resolve() / paths.new_run_id("check")
    root.mkdir(parents=True)
    phases: dict[str, list[dict[str, Any]]] = {}
    notes: list[str] = []
    info = kvm.probe()
    print(f"check-functional: results in {root}; {info.reason}", flush=True)
    if only in (None, "host"):
        phases["host"] = run_host_phase(root / "host", tags)
    if only == "lab" or (only is None and not info.usable and not paths.in_lab()):
        phases["lab"] = run_lab_phase(root / "lab", tags, notes)
    ok, lines = merge(phases)
    lines += [f"note: {n}" for n in notes]
    summary = "\n".join(lines)
    (root / "summary.txt").write_text(summary + "\n")
    print("\n== functional summary (a test must PASS somewhere; nothing may FAIL/ERROR)")
    print(summary)
    print(f"== {'PASSED' if ok else 'FAILED'} in {time.monotonic() - t0:.0f}s; results: {root}")
    return 0 if ok else 1
