"""A kernel judged against a reference kernel's runs on the same host (``apflab compare``).

Absolute bounds calibrated in the nested lab say little on a bare-metal host,
where a healthy ready→ACK is microseconds; a candidate compared with runs of a
reference kernel on the same host needs no absolute number.  The unit of
evidence is the **run**: each run gives one value per metric and statistic (its
p50, its p99), so run-to-run variation, not the thousands of samples inside one
run, decides what is significant (pseudo-replication would make any shift
"significant").  Per metric and statistic:

* the **ratio** of the candidates' median value to the baseline's, with a
  bootstrap 95 % confidence interval (percentile method, resampling runs);
* a two-sided **Mann-Whitney U** test (exact for small samples) of the two sets of
  run values;
* **FAIL** only when the change is both significant (p < alpha) and beyond the
  ratio threshold (the interval's low end above it, for a slowdown);
* **INCONCLUSIVE** ("N more runs needed") when a side has fewer runs than the
  test needs to ever reach p < alpha (4 and 4 for alpha 0.05: with 3 and 3 the
  smallest exact two-sided p is 0.1) — never a silent PASS.

Every candidate and baseline run's own verdict must be PASS as well: a
candidate that FAILs by itself fails the comparison, a baseline that is not
PASS makes it INCONCLUSIVE.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from apflab.analysis.analyzer import analyze_trace
from apflab.analysis.stats import Histogram
from apflab.errors import UsageError
from apflab.report import compare as compare_report
from apflab.run.records import VCPUS_FILE, read_vcpus, trace_of, vcpu_of_pid

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
#: the metrics compared, and the statistics of each run compared
METRICS = ("ready_to_ack", "queued_completed_to_ready", "not_present_to_ready")
STATISTICS = ("p10", "p50", "p99")


@dataclass(frozen=True)
class Rules:
    """When a change counts.

    :ivar alpha: significance level of the Mann-Whitney U test
    :ivar ratio: the slowdown (candidate / baseline) a change must exceed, per
        statistic: the low end and the median move little on a healthy kernel (a late
        ACK moves the low end first), tails much more
    :ivar bootstrap: resamples for the confidence interval
    """

    alpha: float = 0.05
    ratio: dict[str, float] = field(default_factory=lambda: {"p10": 1.15, "p50": 1.25, "p99": 1.5})
    bootstrap: int = 2000
    seed: int = 1


@dataclass(frozen=True)
class Run:
    """One run's verdict and per-metric statistics (read from its verdict.json)."""

    path: str
    verdict: str
    reason: str
    kernel: str
    values: dict[str, dict[str, float]]

    @classmethod
    def load(cls, results_dir: Path) -> Run:
        doc_path = results_dir / "verdict.json"
        try:
            doc = json.loads(doc_path.read_text())
        except (OSError, ValueError) as err:
            raise UsageError(
                f"{results_dir}: no readable verdict.json ({err}): pass run dirs"
            ) from None
        lat = doc.get("latency_us") or {}
        values = {
            m: {s: float(v) for s in STATISTICS if (v := (lat.get(m) or {}).get(s)) is not None}
            for m in METRICS
        }
        kernel = doc.get("kernel") or {}
        name = f"{kernel.get('release')} {str(kernel.get('sha256'))[:12]}"
        return cls(str(results_dir), doc["verdict"], doc["reason"], name, values)


@dataclass(frozen=True)
class Change:
    """One metric's statistic, candidates against the baseline."""

    metric: str
    statistic: str
    candidate: list[float]
    baseline: list[float]
    ratio: float | None
    ci: tuple[float, float] | None
    p_value: float | None
    verdict: str
    why: str


def min_runs(alpha: float) -> int:
    """Runs per side for the exact two-sided Mann-Whitney test to reach p < alpha."""
    n = 2
    while 2 / math.comb(2 * n, n) >= alpha:
        n += 1
    return n


def _ratio_ci(c: Sequence[float], b: Sequence[float], rules: Rules) -> tuple[float, float]:
    def ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        out: np.ndarray = np.median(x, axis=axis) / np.median(y, axis=axis)
        return out

    res = stats.bootstrap(
        (np.asarray(c), np.asarray(b)),
        ratio,
        n_resamples=rules.bootstrap,
        method="percentile",
        random_state=np.random.default_rng(rules.seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def compare_one(
    metric: str, statistic: str, c: list[float], b: list[float], rules: Rules
) -> Change:
    need = min_runs(rules.alpha)
    if len(c) < need or len(b) < need:
        more = max(0, need - len(c)) + max(0, need - len(b))
        why = f"{len(c)} candidate and {len(b)} baseline runs: {more} more run(s) needed"
        return Change(metric, statistic, c, b, None, None, None, INCONCLUSIVE, why)
    ratio = float(np.median(c) / np.median(b)) if np.median(b) > 0 else math.inf
    ci = _ratio_ci(c, b, rules)
    p = float(stats.mannwhitneyu(c, b, alternative="two-sided", method="exact").pvalue)
    limit = rules.ratio[statistic]
    slower = p < rules.alpha and ci[0] > limit
    verdict = FAIL if slower else PASS
    why = (
        f"{statistic} x{ratio:.2f} (95% CI {ci[0]:.2f}-{ci[1]:.2f}), Mann-Whitney p={p:.3g}: "
        + ("slower beyond" if slower else "within")
        + f" x{limit:g} at alpha {rules.alpha:g}"
    )
    return Change(metric, statistic, c, b, ratio, ci, p, verdict, why)


def compare(candidates: Sequence[Run], baseline: Sequence[Run], rules: Rules) -> dict[str, Any]:
    """The comparison document: a verdict, its reason, every change."""
    changes = [
        compare_one(
            m,
            s,
            [r.values[m][s] for r in candidates if s in r.values[m]],
            [r.values[m][s] for r in baseline if s in r.values[m]],
            rules,
        )
        for m in METRICS
        for s in STATISTICS
    ]
    failed_own = [r for r in candidates if r.verdict != PASS]
    bad_base = [r for r in baseline if r.verdict != PASS]
    slower = [c for c in changes if c.verdict == FAIL]
    unsure = [c for c in changes if c.verdict == INCONCLUSIVE]
    if failed_own:
        own = failed_own[0]
        verdict, reason = FAIL, f"a candidate run is {own.verdict} by itself: {own.reason}"
    elif bad_base:
        bad = bad_base[0]
        verdict, reason = INCONCLUSIVE, f"a baseline run is not PASS ({bad.verdict}): {bad.reason}"
    elif slower:
        verdict, reason = FAIL, f"{slower[0].metric} {slower[0].why}"
    elif unsure:
        verdict, reason = INCONCLUSIVE, unsure[0].why
    else:
        verdict, reason = PASS, "no significant slowdown beyond the ratio thresholds"
    return {
        "verdict": verdict,
        "reason": reason,
        "rules": asdict(rules),
        "candidates": [asdict(r) for r in candidates],
        "baseline": [asdict(r) for r in baseline],
        "changes": [asdict(c) for c in changes],
    }


def run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Run dirs from what the user named: run dirs, or dirs holding run dirs."""
    out: list[Path] = []
    for p in paths:
        if (p / "verdict.json").is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(
                d for d in p.iterdir() if (d / "verdict.json").is_file() and not d.is_symlink()
            )
            if not found:
                raise UsageError(f"{p}: neither a run dir nor a dir of run dirs (no verdict.json)")
            out += found
        else:
            raise UsageError(f"{p} does not exist: pass results/<run-id> dirs")
    return out


def pooled(runs: Sequence[Run]) -> dict[str, Histogram]:
    """Every run's samples of each metric in one histogram (for the overlaid CDFs)."""
    out = {m: Histogram() for m in METRICS}
    for r in runs:
        d = Path(r.path)
        trace = trace_of(d)
        if trace is None or trace.name == "trace.txt":  # a partial trace is not a run's
            continue
        vcpus = vcpu_of_pid(read_vcpus(d / VCPUS_FILE)) if (d / VCPUS_FILE).is_file() else None
        analysis, _ = analyze_trace(trace, vcpus)
        for m in METRICS:
            out[m].merge(analysis.latency[m])
    return out


def compare_dirs(
    candidates: Sequence[Path], baseline: Sequence[Path], out: Path, rules: Rules
) -> dict[str, Any]:
    """Compare run dirs; write compare.json and compare.html into ``out``."""
    cand = [Run.load(d) for d in run_dirs(candidates)]
    base = [Run.load(d) for d in run_dirs(baseline)]
    doc = compare(cand, base, rules)
    c_hist, b_hist = pooled(cand), pooled(base)
    overlays = {m: (c_hist[m], b_hist[m]) for m in METRICS}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(doc, indent=1) + "\n")
    doc["report"] = str(compare_report.write(out, doc, overlays))
    return doc
