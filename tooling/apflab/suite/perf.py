"""``make bench`` (``apflab bench --full``): what a verdict costs here, measured.

* **warm run** — one ``apflab run`` of the default scenario with images and venv in
  place (``warm_run_s``; its phases from verdict.json, the lab's L1 boot included),
  and how far into its workload it had the goal's 10,000 page-readies;
* **cold run** (``--cold``) — a fresh clone with an empty image cache runs ``make run``;
* **observer overhead** — the workload's wall time with tracing on ÷ off, runs
  interleaved (on, record, off, on, ...), ``samples`` of each, in one lab; ``record``
  (the events read only after the workload) splits the cost into recording and reading;
* **boot modes** — in one lab, the L2 guest's boot with ``--boot cold`` and with
  ``--boot saved`` (the first saved run makes the saved boot, the next ones restore
  it), ``samples`` of each, interleaved; their verdicts and async-PF counts beside
  the boot seconds, so a saved boot that judges differently shows here;
* **analyzer** — parse + analyze events/s on a recorded trace, and the peak RSS of
  a fresh process that analyses it (its ``VmHWM``);
* **loss knee** — lost events at the lab's top async-PF rate as the tracer's per-CPU
  ring buffer shrinks (one run per size, largest first, until a size loses events):
  the emulated L1 caps the rate of async PFs, so the buffer is the axis that can be
  pushed until loss, and the rate of each run is reported beside it;
* **reader knee** — the trace reader's own loss knee in L1: ``trace_marker`` floods
  at rising rates into a real trace session (:mod:`apflab.suite.tracerate`);
* **lost events** — summed over every run above with the default trace buffer (the
  tracer's overrun + dropped; the loss sweep's smaller buffers are reported apart).

Everything lands in ``results/bench.json`` with the machine and the commit.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from apflab import paths
from apflab.analysis.analyzer import iter_trace_events
from apflab.analysis.guest import WORKLOAD_START
from apflab.analysis.parse import Kind, ParseStats
from apflab.lab.l1 import Lab, LabConfig
from apflab.process import run
from apflab.run import dispatch
from apflab.run.batch import Batch
from apflab.run.records import trace_of
from apflab.run.scenario import Scenario
from apflab.suite.bench import DEFAULT_RAW, bench_analyzer
from apflab.undo import UndoStack

Emit = Callable[[str], None]


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "commit": paths.repo_commit(),
    }


#: the page-readies a warm run must reach (the goal of make bench's warm run)
GOAL_READIES = 10_000


def nth_ready_s(trace: Path, n: int = GOAL_READIES) -> float | None:
    """Seconds from the workload's start (its trace marker) to the trace's ``n``-th
    page-ready: how long a workload stopped at ``n`` page-readies would have run.
    None when the trace has fewer, or no start marker."""
    stats = ParseStats()
    ready = [e.ts_us for e in iter_trace_events(trace, stats) if e.kind == Kind.READY]
    start = stats.marker(WORKLOAD_START)
    if start is None:
        return None
    after = [ts for ts in ready if ts >= start]
    return round((after[n - 1] - start) / 1e6, 1) if len(after) >= n else None


def warm_run(results: Path, emit: Emit) -> dict[str, Any]:
    """One default run, timed end to end (a fresh L1 unless a lab is up), and when
    its workload had the goal's page-readies."""
    t0 = time.monotonic()
    doc = dispatch.run(Scenario(), results, emit)
    took = round(time.monotonic() - t0, 1)
    trace = trace_of(results / str(doc.get("run_id")))
    return {
        "warm_run_s": took,
        "warm_run_10k_ready_workload_s": nth_ready_s(trace) if trace else None,
        "warm_run_verdict": doc["verdict"],
        "warm_run_events": (doc.get("events") or {}).get("ready"),
        "warm_run_async_pfs": (doc.get("events") or {}).get("not_present"),
        "lost_events": (doc.get("events") or {}).get("lost"),
        "phases_s": doc.get("phases_s"),
    }


#: the ring buffer of the "record" runs: the whole workload's events without a reader
#: (~101k events, ~4 MB in the 8 MiB default; 32 MiB leaves room for a busier run)
RECORD_BUFFER_KB = 32768


def observer_overhead(results: Path, samples: int, emit: Emit) -> dict[str, Any]:
    """Workload seconds with tracing on, as text, recording only, and off, interleaved,
    in one lab.

    ``record`` keeps the events in the ring buffer and reads them after the workload,
    so on - record is what the reader costs (its thread copying the raw pages, and
    the stall watch counting them) and record - off what recording the events costs
    (the tracepoints in L1's KVM, their filters and the ring buffer); ``text`` is the
    reader of text (``trace_pipe``: the kernel formats every event), the way before
    the raw capture."""
    base = Scenario()
    modes = {
        "on": replace(base, trace="on"),
        "text": replace(base, trace="text"),
        "record": replace(base, trace="record", trace_buffer_kb=RECORD_BUFFER_KB),
        "off": replace(base, trace="off"),
    }
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    # the trace reader's CPU seconds in each streaming run
    reader_cpu: dict[str, list[float | None]] = {"on": [], "text": []}
    lost = record_lost = 0
    with Batch(emit) as batch:
        for _ in range(samples):
            for trace, scenario in modes.items():
                root = results / f"trace-{trace}"
                doc = batch.run(scenario, root)
                wl = doc.get("workload") or {}
                if wl.get("completed"):
                    seconds[trace].append(float(wl["seconds"]))
                rec = root / str(doc.get("run_id")) / "run.json"
                if trace in ("on", "text") and rec.is_file():
                    reader_cpu[trace].append(
                        (json.loads(rec.read_text()).get("trace") or {}).get("reader_cpu_s")
                    )
                n = int((doc.get("events") or {}).get("lost") or 0)
                if trace == "record":
                    record_lost += n
                else:
                    lost += n
    med = {m: statistics.median(v) if v else None for m, v in seconds.items()}
    on, text, record, off = med["on"], med["text"], med["record"], med["off"]
    return {
        "observer_overhead_ratio": round(on / off, 3) if on and off else None,
        "observer_text_ratio": round(text / off, 3) if text and off else None,
        "observer_record_ratio": round(record / off, 3) if record and off else None,
        "workload_s": seconds,
        "observer_reader_cpu_s": reader_cpu,
        "observer_lost_events": lost,
        "observer_record_lost_events": record_lost,
    }


def boot_modes(results: Path, samples: int, emit: Emit) -> dict[str, Any]:
    """The guest's boot seconds (run.json) cold and restored, interleaved, in one lab;
    the first saved run, which boots cold to make the saved boot, is kept apart."""
    runs: dict[str, list[dict[str, Any]]] = {"first-saved": [], "cold": [], "saved": []}
    with Batch(emit) as batch:
        for i in range(samples + 1):
            for mode in ("saved", "cold") if i else ("saved",):
                kind = mode if i else "first-saved"  # it boots cold and saves first
                root = results / f"boot-{kind}"
                doc = batch.run(replace(Scenario(), boot=mode), root)
                rec = root / str(doc.get("run_id")) / "run.json"
                run_json = json.loads(rec.read_text()) if rec.is_file() else {}
                guest = run_json.get("guest", {})
                runs[kind].append(
                    {
                        "boot_mode": guest.get("boot_mode"),
                        "boot_s": guest.get("boot_seconds"),
                        "limit_mb": (run_json.get("pressure") or {}).get("limit_mb"),
                        "workload_s": (run_json.get("phases_s") or {}).get("workload"),
                        "verdict": doc.get("verdict"),
                        "async_pfs": (doc.get("events") or {}).get("not_present"),
                        "lost": (doc.get("events") or {}).get("lost"),
                        "ready_to_ack_p50_us": (
                            (doc.get("latency_us") or {}).get("ready_to_ack") or {}
                        ).get("p50"),
                    }
                )
    restored = [r["boot_s"] for r in runs["saved"] if r["boot_mode"] == "restored" and r["boot_s"]]
    cold = [r["boot_s"] for r in runs["cold"] if r["boot_s"]]
    return {
        "boot_cold_s": statistics.median(cold) if cold else None,
        "boot_restored_s": statistics.median(restored) if restored else None,
        "boot_runs": runs,
    }


#: the per-CPU trace buffers of the loss sweep, largest first (8192 is the default)
KNEE_BUFFERS_KB = (8192, 64, 16, 4)


def loss_knee(results: Path, buffers_kb: tuple[int, ...], emit: Emit) -> dict[str, Any]:
    """Lost events with each trace buffer size, in one lab, until a size loses some."""
    runs: list[dict[str, Any]] = []
    with Batch(emit) as batch:
        for kb in buffers_kb:
            doc = batch.run(replace(Scenario(), trace_buffer_kb=kb), results / f"buffer-{kb}k")
            events = doc.get("events") or {}
            seconds = float((doc.get("workload") or {}).get("seconds") or 0)
            async_pfs = int(events.get("not_present") or 0)
            runs.append(
                {
                    "buffer_kb": kb,
                    "verdict": doc.get("verdict"),
                    "async_pfs": async_pfs,
                    "workload_s": seconds,
                    "async_pfs_per_min": round(async_pfs / seconds * 60) if seconds else None,
                    "lost": events.get("lost"),
                }
            )
            emit(f"loss sweep: {kb} KB per CPU: lost {events.get('lost')}")
            if events.get("lost"):
                break
    lossless = [r for r in runs if r["lost"] == 0]
    lossy = [r for r in runs if r["lost"]]
    return {
        "loss_runs": runs,
        "loss_smallest_lossless_buffer_kb": min((r["buffer_kb"] for r in lossless), default=None),
        "loss_first_lossy_buffer_kb": lossy[0]["buffer_kb"] if lossy else None,
        "loss_top_async_pfs_per_min": max(
            (r["async_pfs_per_min"] or 0 for r in lossless), default=None
        ),
    }


#: the trace reader's flood (suite/tracerate): rates (events/s), buffers, seconds each
FLOOD_RATES = (2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000)
FLOOD_BUFFERS_KB = (8192, 4)
FLOOD_SECONDS = 10.0


def reader_knee(results: Path, emit: Emit) -> dict[str, Any]:
    """The trace reader's loss knee in L1, where the runs trace (suite/tracerate)."""
    argv = ["apflab", "bench", "--trace-flood", ",".join(map(str, FLOOD_RATES))]
    argv += ["--flood-buffers", ",".join(map(str, FLOOD_BUFFERS_KB))]
    argv += ["--flood-seconds", str(FLOOD_SECONDS)]
    # its progress is on stderr; stdout is the JSON read below
    progress = dispatch.indent_output(emit, streams=("stderr",))
    undo = UndoStack(paths.new_run_id("flood"))
    with undo, Lab(LabConfig(), results / "flood-lab", undo) as lab:
        res = lab.run(argv, timeout=3600, on_output=progress)
    doc = json.loads(res.stdout)
    knees = {int(kb): k for kb, k in doc["knee"].items()}
    return {
        "reader_floods": doc["floods"],
        "reader_knee": knees,
    }


def peak_rss_mib(trace: Path) -> float:
    """The peak RSS of a fresh process that analyses ``trace``: its ``VmHWM``.

    Not ``ru_maxrss``: Linux keeps that across ``execve``, so a child forked from
    this process (which holds the whole trace it benchmarked) would report this
    process's size; ``VmHWM`` belongs to the new program's own address space.
    """
    code = (
        "import sys;from apflab.analysis.analyzer import analyze_trace;"
        "analyze_trace(sys.argv[1]);"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code, str(trace)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return round(int(out.stdout.split()[1]) / 1024, 1)  # "VmHWM:  25200 kB"


def default_raw_capture() -> Path | None:
    """The raw capture of the unit-test fixtures (record-1), in a source checkout."""
    root = paths.repo_root()
    path = root / DEFAULT_RAW if root is not None else None
    return path if path is not None and path.is_dir() else None


#: timed passes of each analyzer stage (the best is kept: this host's neighbours make
#: single passes vary up to 2x)
ANALYZER_REPEAT = 10


def analyzer(trace: Path) -> dict[str, Any]:
    """Events/s (best of :data:`ANALYZER_REPEAT`) and, in a fresh process, the peak
    RSS of one analysis."""
    rates = bench_analyzer(trace, repeat=ANALYZER_REPEAT)
    raw = default_raw_capture()
    raw_rates = bench_analyzer(raw, repeat=ANALYZER_REPEAT) if raw is not None else {}
    return {
        "analyzer_code": rates["code"],
        # the runs' own capture since the raw reader: its pages decoded + analysed
        "analyzer_raw_trace": str(raw) if raw is not None else None,
        "analyzer_raw_events": raw_rates.get("events"),
        "analyzer_raw_events_per_s": raw_rates.get("analyze_events_per_s"),
        "decoder_raw_events_per_s": raw_rates.get("parse_events_per_s"),
        "analyzer_trace": str(trace),
        "analyzer_events": rates["events"],
        "analyzer_events_per_s": rates["analyze_events_per_s"],
        "parser_events_per_s": rates["parse_events_per_s"],
        "analysis_only_events_per_s": rates["analyze_only_events_per_s"],
        "analyzer_peak_rss_mib": peak_rss_mib(trace),
        "analyzer_raw_peak_rss_mib": peak_rss_mib(raw) if raw is not None else None,
        "this_process_peak_rss_mib": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
    }


def cold_run(root: Path, emit: Emit) -> dict[str, Any]:
    """A fresh clone of this checkout with an empty image cache: ``make run`` (its
    output in ``cold-run.log``)."""
    repo = paths.repo_root()
    if repo is None:
        return {"cold_run_s": None}
    with tempfile.TemporaryDirectory(prefix="apflab-cold-") as tmp:
        clone = Path(tmp) / "clone"
        run(["git", "clone", "-q", str(repo), str(clone)])
        env = {"APFLAB_CACHE": str(Path(tmp) / "cache")}
        res = run(["make", "run"], cwd=clone, env=env, check=False, timeout=3600)
    (root / "cold-run.log").write_text(res.stdout + res.stderr)
    emit(f"cold make run: exit {res.exit_status} in {res.duration:.0f}s")
    return {"cold_run_s": round(res.duration, 1), "cold_run_exit": res.exit_status}


def bench(
    results: Path,
    trace: Path,
    samples: int,
    cold: bool,
    emit: Emit,
    knee_buffers_kb: tuple[int, ...] = KNEE_BUFFERS_KB,
) -> dict[str, Any]:
    root = results.resolve() / paths.new_run_id("bench")
    root.mkdir(parents=True)
    doc: dict[str, Any] = {"machine": machine(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    doc |= analyzer(trace)
    doc |= warm_run(root / "warm", emit)
    doc |= observer_overhead(root, samples, emit)
    doc |= boot_modes(root, samples, emit)
    doc |= loss_knee(root, knee_buffers_kb, emit)
    doc |= reader_knee(root, emit)
    # every run with the default trace buffer (the loss sweep's smaller ones lose on purpose)
    default_kb = Scenario().trace_buffer_kb
    doc["lost_events"] = (
        (doc["lost_events"] or 0)
        + doc["observer_lost_events"]
        + sum(r["lost"] or 0 for rs in doc["boot_runs"].values() for r in rs)
        + sum(r["lost"] or 0 for r in doc["loss_runs"] if r["buffer_kb"] == default_kb)
    )
    if cold:
        doc |= cold_run(root, emit)
    (results / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc
