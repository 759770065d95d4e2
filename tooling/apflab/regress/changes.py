"""What changed: new FAILs, and latency regressions over a kernel's history.

Two kinds of finding, in this order (the first matter most):

* **PASS → FAIL** — a kernel whose runs passed on earlier nights and fails on a
  later one: the first such night and its failing runs (``new FAIL``); a kernel that
  has failed since its first night is named too (``FAIL``, from that night), so a
  broken kernel is flagged on the night it joins the matrix;
* **latency regression** — for each kernel and metric, its runs' statistic in time
  order (night by night), split by E-divisive means (the Hunter/Otava change-point method,
  ``otava.analysis.compute_change_points``): a change point where the level goes
  *up* by more than :attr:`Rules.min_magnitude` is a regression, named by the first
  night of the new level and the runs that show it.  A slow drift shows as a
  series of such points; noise, as none.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from otava.analysis import compute_change_points

#: the metrics watched over history (verdict.json latency_us keys)
WATCHED = ("ready_to_ack", "queued_completed_to_ready", "not_present_to_ready")


@dataclass(frozen=True)
class Rules:
    """:ivar max_pvalue: significance of a change point
    :ivar min_magnitude: a relative rise smaller than this is not reported"""

    max_pvalue: float = 0.01
    min_magnitude: float = 0.10
    window: int = 50


@dataclass(frozen=True)
class Finding:
    kind: str  # "new FAIL" | "FAIL" (since its first night) | "latency regression"
    kernel: str
    metric: str | None
    first_night: str
    runs: list[str]
    detail: str


def _by_night(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The runs of each night, nights in time order (by their first run's start; the
    night's name breaks ties, so "night-10" after "night-9" when they ran so)."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault(str(r["night"]), []).append(r)

    def began(item: tuple[str, list[Mapping[str, Any]]]) -> tuple[str, str]:
        night, runs = item
        return (min(str(r.get("started_at") or "") for r in runs), night)

    return dict(sorted(out.items(), key=began))


def new_fails(kernel: str, rows: Sequence[Mapping[str, Any]]) -> list[Finding]:
    """The night a kernel's current run of failing nights began (a night fails if any
    of its runs does): ``new FAIL`` when the kernel had passed before that night, ``FAIL``
    when it has failed since its first night; nothing when its last night passed."""
    passed_before = False
    start: tuple[str, list[Mapping[str, Any]], int, bool] | None = None
    for night, runs in _by_night(rows).items():
        fails = [r for r in runs if r["verdict"] == "FAIL"]
        if not fails:
            if any(r["verdict"] == "PASS" for r in runs):
                start = None  # it passed again (a night of INVALID/ERROR only says nothing)
        elif start is None:
            start = (night, fails, len(runs), passed_before)
        passed_before = passed_before or all(r["verdict"] == "PASS" for r in runs)
    if start is None:
        return []
    night, fails, total, had_passed = start
    kind = "new FAIL" if had_passed else "FAIL"
    since = "" if had_passed else " (it has failed since its first night)"
    detail = f"{len(fails)} of {total} runs FAIL{since}: {fails[0]['reason']}"
    return [Finding(kind, kernel, None, night, [str(r["run_id"]) for r in fails], detail)]


def regressions(kernel: str, rows: Sequence[Mapping[str, Any]], rules: Rules) -> list[Finding]:
    """Change points upward in each watched metric, run by run in time order (nights in
    order, a night's runs by start time): a second night is already judged against the
    first, and a change point inside a night names that night."""
    out: list[Finding] = []
    for metric in WATCHED:
        series = [
            (night, float(r["metrics"][metric]), str(r["run_id"]))
            for night, runs in _by_night(rows).items()
            for r in sorted(runs, key=lambda r: str(r.get("started_at") or ""))
            if metric in r["metrics"]
        ]
        if len({night for night, _, _ in series}) < 2 or len(series) < 4:
            continue
        points, _ = compute_change_points(
            [v for _, v, _ in series], window_len=rules.window, max_pvalue=rules.max_pvalue
        )
        for cp in points:
            i = int(cp.index)
            before = statistics.median(v for _, v, _ in series[:i])
            after = statistics.median(v for _, v, _ in series[i:])
            rise = after / before - 1 if before > 0 else 0.0
            if rise > rules.min_magnitude:
                night = series[i][0]
                run_ids = [run_id for n, _, run_id in series[i:] if n == night]
                detail = (
                    f"{metric} median {before:.0f} -> {after:.0f} us (+{rise:.0%}) over "
                    f"{i} run(s) before and {len(series) - i} from night {night}"
                )
                out.append(Finding("latency regression", kernel, metric, night, run_ids, detail))
    return out


def detect(history: Sequence[Mapping[str, Any]], rules: Rules | None = None) -> list[Finding]:
    """Every finding of every kernel in the history: new FAILs first, then regressions."""
    rules = rules or Rules()
    by_kernel: dict[str, list[Mapping[str, Any]]] = {}
    for r in history:
        if r.get("night") is not None:
            by_kernel.setdefault(str(r["kernel"]), []).append(r)
    fails = [f for k, rows in sorted(by_kernel.items()) for f in new_fails(k, rows)]
    slow = [f for k, rows in sorted(by_kernel.items()) for f in regressions(k, rows, rules)]
    return fails + slow
