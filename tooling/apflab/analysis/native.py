"""The analyzer's hot modules compiled to C by mypyc, and the guard against stale builds.

``make native`` (a prerequisite of ``make unit``, ``check``, ``bench`` and the heavy
tiers; not of ``make run``) runs :func:`build`: mypyc compiles
:data:`MODULES` — the same source, type-checked, as C extensions next to the
``.py`` files (``parse.cpython-311-x86_64-linux-gnu.so``, ...) — and writes the
sources' hashes to :data:`STAMP`.  Python then imports the extensions in place of
the source.  They run the same code 1.5-4x faster (docs/performance.md,
"The analyzer").  Nothing depends on them: without a build the package runs as
plain Python (as in L1, where the source ships without them).

A compiled module is only used while every source of :data:`MODULES` still
hashes as it did when they were built.  Otherwise (a source edited, a checkout
moved on) :func:`select` makes the package import the ``.py`` files, says so
once in the log, and ``make`` rebuilds.  ``APFLAB_PURE=1`` asks for plain Python
too (the unit tests check that both ways read fixtures the same).

This module itself is never compiled: the package's ``__init__`` calls
:func:`select` before any of them is imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from importlib import machinery
from pathlib import Path

log = logging.getLogger(__name__)

#: the modules compiled, in the package ``apflab.analysis``: the parsers, the analysis
#: and the records it works on per event
MODULES = (
    "parse",
    "ringbuf",
    "analyzer",
    "tokens",
    "acks",
    "state",
    "stats",
    "timeline",
    "classify",
    "model",
)
PACKAGE_DIR = Path(__file__).resolve().parent
#: the hashes of the compiled sources, written by :func:`build`
STAMP = PACKAGE_DIR / ".native.json"
#: set to 1: import the ``.py`` files even when compiled ones are in place
PURE_ENV = "APFLAB_PURE"

#: how the package runs: "compiled", or "python (why)"; set by :func:`select`
mode = "python"

_SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
target, temp, lib, *sources = sys.argv[1:]
setup(
    name="apflab-native",
    ext_modules=mypycify(sources, opt_level="3", target_dir=target),
    script_args=["build_ext", "--inplace", "--build-temp", temp, "--build-lib", lib],
)
"""


def _sources(directory: Path = PACKAGE_DIR) -> dict[str, str]:
    return {m: hashlib.sha256((directory / f"{m}.py").read_bytes()).hexdigest() for m in MODULES}


def compiled_files() -> list[Path]:
    """The extension modules of :data:`MODULES` in place (and mypyc's shared library)."""
    found = [
        PACKAGE_DIR / f"{m}{suffix}"
        for m in MODULES
        for suffix in machinery.EXTENSION_SUFFIXES
        if (PACKAGE_DIR / f"{m}{suffix}").exists()
    ]
    tooling = PACKAGE_DIR.parent.parent
    return found + sorted(tooling.glob("*__mypyc.*"))


def why_not(directory: Path = PACKAGE_DIR) -> str | None:
    """None when the compiled modules in ``directory`` may be used; else why not."""
    if os.environ.get(PURE_ENV) == "1":
        return f"{PURE_ENV}=1"
    if not any(
        (directory / f"{m}{suffix}").exists()
        for m in MODULES
        for suffix in machinery.EXTENSION_SUFFIXES
    ):
        return "not compiled: `make native`"
    try:
        built = json.loads((directory / STAMP.name).read_text()).get("sources")
    except (OSError, ValueError):
        built = None
    if built != _sources(directory):
        return "compiled modules older than their source: `make native` rebuilds them"
    return None


def select() -> str:
    """Import :data:`MODULES` compiled when their build is current, else as Python.

    Must run before any of them is imported (the package's ``__init__``).
    Returns (and keeps in :data:`mode`) what was chosen.
    """
    global mode  # noqa: PLW0603 (set once, at the package's import)
    why = why_not()
    if why is None:
        mode = "compiled"
        return mode
    mode = f"python ({why})"
    if why.startswith("compiled"):
        log.warning("apflab.analysis: %s; running them as Python meanwhile", why)
    # the package's own directory gets a finder without the extension loader, so its
    # submodules come from the .py files whatever lies beside them
    sys.path_importer_cache[str(PACKAGE_DIR)] = machinery.FileFinder(
        str(PACKAGE_DIR),
        (machinery.SourceFileLoader, machinery.SOURCE_SUFFIXES),
        (machinery.SourcelessFileLoader, machinery.BYTECODE_SUFFIXES),
    )
    return mode


def clean() -> list[Path]:
    """Remove the compiled modules and the stamp; returns what was removed."""
    gone = compiled_files()
    for path in [*gone, STAMP]:
        path.unlink(missing_ok=True)
    return gone


def build(build_dir: Path) -> None:
    """Compile :data:`MODULES` with mypyc in place (C in ``build_dir``), then stamp them.

    :raises subprocess.CalledProcessError: mypyc or the C compiler failed (its output
        went to stderr)
    """
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        raise RuntimeError("no C compiler (cc): apt-get install gcc")
    clean()
    tooling = PACKAGE_DIR.parent.parent
    sources = [str(Path("apflab", "analysis", f"{m}.py")) for m in MODULES]
    hashes = _sources()
    dirs = [str(build_dir / d) for d in ("c", "temp", "lib")]
    subprocess.run(
        [sys.executable, "-c", _SETUP, *dirs, *sources],
        cwd=tooling,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    STAMP.write_text(json.dumps({"sources": hashes}, indent=1, sort_keys=True) + "\n")


def main(argv: list[str]) -> int:
    """build, clean or status (the Makefile's ``make native``, ``make clean-native``)."""
    what = argv[0] if argv else "status"
    if what == "build":
        root = PACKAGE_DIR.parent.parent.parent
        build(root / "build" / "native")
        print(f"native: compiled {', '.join(MODULES)}")
    elif what == "clean":
        print(f"native: removed {len(clean())} compiled file(s)")
    elif what == "status":
        print(f"apflab.analysis: {mode}")
    else:
        print(f"native: unknown command {what!r}: build, clean or status", file=sys.stderr)
        return 4
    return 0
