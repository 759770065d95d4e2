"""The analyzer compiled by mypyc (``make native``) reads every kind of fixture as the
Python source does, and a build older than its source is never used.

The comparison runs this process's analyzer (compiled under ``make unit``, which
says so with ``APFLAB_EXPECT_NATIVE=1``) against a child with ``APFLAB_PURE=1``:
every decoded event, the parser's counters and the analysis document.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apflab.analysis import native, parse, ringbuf
from apflab.analysis.analyzer import analyze_trace
from apflab.analysis.verdict import analysis_document

TRACES = Path(__file__).parent / "fixtures" / "traces"
#: raw captures (one CPU, lossy pages, two CPUs merged) and text traces (the #PF
#: classification, the heuristic one, a LOST line)
FIXTURES = (
    "record-1/trace.raw",
    "lossy-4k-1/trace.raw",
    "flood-lossy-l0",
    "stock-1-full.trace.xz",
    "derived-no-pf-events.trace",
    "flood-lossy-l0.trace",
)


def digest(path: Path) -> dict[str, object]:
    """What a trace reads as here: the events' hash, the counters, the analysis."""
    stats = parse.ParseStats()
    h = hashlib.sha256()
    if ringbuf.is_capture(path):
        events = list(ringbuf.iter_raw_events(path, stats))
    else:
        with parse.open_trace(path) as f:
            events = list(parse.iter_events(f, stats))
    for ev in events:
        h.update(repr(tuple(int(x) for x in ev)).encode())
    analysis, _ = analyze_trace(path)
    return {
        "events": len(events),
        "sha256": h.hexdigest(),
        "stats": [stats.lines, stats.header, stats.events, stats.unparsed, stats.malformed],
        "lost": [stats.lost_marks, stats.lost_counted, len(stats.markers)],
        "analysis": analysis_document(analysis),
    }


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_native import FIXTURES, TRACES, digest
import apflab.analysis.parse as p
from apflab.analysis import native
print(json.dumps({"mode": native.mode, "parse": p.__file__,
                  "fixtures": {f: digest(TRACES / f) for f in FIXTURES}}))
"""


def test_the_compiled_analyzer_reads_every_fixture_as_the_source_does() -> None:
    env = {**os.environ, native.PURE_ENV: "1"}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    pure = json.loads(child.stdout)
    assert pure["mode"] == f"python ({native.PURE_ENV}=1)"
    assert pure["parse"].endswith(".py")
    for name in FIXTURES:
        here = json.loads(json.dumps(digest(TRACES / name)))
        assert here["events"] > 0, name
        assert here == pure["fixtures"][name], name


def test_make_runs_the_analyzer_compiled() -> None:
    """Under make (``APFLAB_EXPECT_NATIVE=1``) the build must be there and current;
    anywhere, the mode matches what the guard says of the files in place."""
    if os.environ.get("APFLAB_EXPECT_NATIVE") == "1":
        assert native.mode == "compiled", native.mode
        assert parse.__file__ is not None
        assert not parse.__file__.endswith(".py")
    assert (native.mode == "compiled") == (native.why_not() is None)


def test_a_build_older_than_its_source_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    for m in native.MODULES:
        shutil.copy(native.PACKAGE_DIR / f"{m}.py", tmp_path / f"{m}.py")
    assert native.why_not(tmp_path) == "not compiled: `make native`"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for m in native.MODULES:
        (tmp_path / f"{m}{suffix}").write_bytes(b"")
    assert native.why_not(tmp_path) is not None  # no stamp: not known to be current
    stamp = tmp_path / native.STAMP.name
    stamp.write_text(json.dumps({"sources": native._sources(tmp_path)}))
    assert native.why_not(tmp_path) is None
    with (tmp_path / "tokens.py").open("a") as f:
        f.write("\n# edited after the build\n")
    why = native.why_not(tmp_path)
    assert why is not None and why.startswith("compiled modules older than their source")


def test_the_pure_switch_wins_over_a_current_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for m in native.MODULES:
        shutil.copy(native.PACKAGE_DIR / f"{m}.py", tmp_path / f"{m}.py")
        (tmp_path / f"{m}{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    (tmp_path / native.STAMP.name).write_text(json.dumps({"sources": native._sources(tmp_path)}))
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    assert native.why_not(tmp_path) is None
    monkeypatch.setenv(native.PURE_ENV, "1")
    assert native.why_not(tmp_path) == f"{native.PURE_ENV}=1"
