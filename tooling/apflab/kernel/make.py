"""Run the kernel's make: argv only, output streamed to a log, progress at least every 10 s.

Kbuild prints one short line per step (``  CC      kernel/fork.o``); :class:`MakeProgress`
counts them by verb, so a 4-minute build reports ``812 CC, 14 LD`` instead of going silent,
and an incremental build can list exactly what it compiled.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from apflab.kernel.cache import KernelBuildError

#: how often a running make reports, whatever it prints
HEARTBEAT_S = 10.0
_STEP = re.compile(r"^  ([A-Z][A-Z0-9_-]{1,11}) +(\S.*)$")
#: inherited variables that would change what make builds, or where; never passed on
_SCRUB = {
    "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "GNUMAKEFLAGS", "ARCH", "SUBARCH",
    "CROSS_COMPILE", "O", "LOCALVERSION", "CC", "HOSTCC", "LD", "CFLAGS", "KCFLAGS",
    "KCPPFLAGS", "KAFLAGS", "LLVM", "INSTALL_MOD_PATH", "W", "C", "V",
}  # fmt: skip
_SCRUB_PREFIXES = ("KBUILD_", "KCONFIG_", "CCACHE_")


@dataclass
class MakeProgress:
    """Counts of Kbuild step lines seen so far, and the objects compiled (``CC`` targets)."""

    steps: Counter[str] = field(default_factory=Counter)
    compiled: list[str] = field(default_factory=list)
    last: str = ""
    #: ccache counters during the build (hits and misses), when ccache is used
    ccache: dict[str, int] = field(default_factory=dict)

    def feed(self, line: str) -> None:
        match = _STEP.match(line)
        if match:
            verb, target = match.groups()
            self.steps[verb] += 1
            self.last = f"{verb} {target}"
            if verb == "CC":
                self.compiled.append(target.strip())

    def summary(self) -> str:
        top = ", ".join(f"{n} {verb}" for verb, n in self.steps.most_common(3))
        return f"{top or 'no steps yet'}" + (f"; last {self.last}" if self.last else "")


def make_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment without what would steer make elsewhere, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith(_SCRUB_PREFIXES)
    }
    env["LC_ALL"] = "C"
    env.update(extra)
    return env


def jobs() -> int:
    """``make -j`` for this machine: the CPUs we may run on (``nproc``)."""
    return len(os.sched_getaffinity(0)) or 1


def compiler_wrapper() -> tuple[str, bool]:
    """``("ccache gcc", True)`` when ccache is installed, else ``("gcc", False)``."""
    return ("ccache gcc", True) if shutil.which("ccache") else ("gcc", False)


def run_make(
    argv: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str],
    log: IO[str],
    progress: Callable[[str], None],
    phase: str,
) -> MakeProgress:
    """Run ``argv``, appending every output line to ``log``; report every :data:`HEARTBEAT_S`.

    :raises KernelBuildError: make exited non-zero (the message has the first error line)
    """
    args = [os.fspath(a) for a in argv]
    log.write(f"$ {' '.join(args)}\n")
    log.flush()
    counts = MakeProgress()
    errors: list[str] = []
    start = time.monotonic()
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env),
        text=True,
        errors="replace",
        bufsize=1,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    next_report = start + HEARTBEAT_S
    try:
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                log.write(line)
                counts.feed(line.rstrip("\n"))
                if " error" in line.lower() or (line.startswith("make") and "Error" in line):
                    errors.append(line.strip())
            now = time.monotonic()
            if now >= next_report:
                progress(f"{phase}: {now - start:.0f}s, {counts.summary()}")
                next_report = now + HEARTBEAT_S
        status = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        log.flush()
    reader.join(timeout=5)
    if status != 0:
        first = errors[0] if errors else f"exit status {status}"
        raise KernelBuildError(f"`{' '.join(args[:1] + args[-1:])}` failed: {first}")
    return counts


def run_long(
    argv: Sequence[str | os.PathLike[str]],
    progress: Callable[[str], None],
    what: str,
    cwd: Path | None = None,
) -> None:
    """Run a long quiet command (tar, apt-get download), saying so every :data:`HEARTBEAT_S`.

    :raises KernelBuildError: it exited non-zero (with the tail of its output)
    """
    args = [os.fspath(a) for a in argv]
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd
        )
        try:
            while True:
                try:
                    status = proc.wait(timeout=HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    progress(f"{what}: {time.monotonic() - start:.0f}s")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if status != 0:
            out.seek(0)
            tail = out.read()[-2000:].decode(errors="replace").strip().splitlines()
            raise KernelBuildError(
                f"`{' '.join(args)}` exited {status}: {tail[-1] if tail else 'no output'}"
            )


#: host programs a build runs (objtool also needs libelf's headers: see :func:`missing_tools`)
TOOLS = {
    "make": "make",
    "gcc": "gcc",
    "ld": "binutils",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "patch": "patch",
    "tar": "tar",
    "xz": "xz-utils",
}


def missing_tools() -> list[str]:
    """Debian packages a kernel build needs that this host lacks."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not Path("/usr/include/gelf.h").is_file():
        missing.append("libelf-dev")
    return missing


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)
