"""Report figures as PNG bytes (matplotlib, Agg canvas; no pyplot, no global state).

matplotlib is imported inside the functions: importing this module costs nothing,
and the figures never touch whatever backend a caller's pyplot uses.

matplotlib's own DEBUG log (a ``findfont`` score for every font it weighs, ~2,100
lines a report) is held back to WARNING unless the caller set its level: inside an
Avocado test, which records DEBUG through its runner, those lines made a verdict's
report take 21-26 s instead of ~3 s (make check of 2026-12-04).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from apflab.analysis.guest import GuestView
from apflab.analysis.stats import Bucket, Histogram

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from apflab.analysis.model import Timeline

_DPI = 96

_MPL_LOG = logging.getLogger("matplotlib")
if _MPL_LOG.level == logging.NOTSET:
    _MPL_LOG.setLevel(logging.WARNING)


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=(width, height), layout="constrained")


def latency_png(metric: str, hist: Histogram, bounds: Mapping[str, int] | None = None) -> bytes:
    """CDF (left) and histogram (right) of one latency metric, log time axis.

    Censored samples (lower bounds: still outstanding at the end) are drawn in
    red: as crosses on the CDF and as a red stack in the histogram, and their
    number is in the title, so a stall is visible at a glance.

    :param bounds: the verdict's bounds for this metric (``{"p10": us, "p99": us, "max":
        us}``), drawn on the CDF: the curve must reach 0.10 left of the p10 line (a
        floor), 0.99 left of the p99 line and 1 left of the max line
    """
    fig = _new_figure(9.0, 3.2)
    ax_cdf, ax_hist = fig.subplots(1, 2)
    title = f"{metric}: {hist.count} samples"
    if hist.censored:
        title += f", {hist.censored} censored (≥, still open at the end)"
    fig.suptitle(title, fontsize=10)
    buckets = list(hist.buckets())
    if not buckets:
        for ax in (ax_cdf, ax_hist):
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        return _png(fig)
    _draw_cdf(ax_cdf, hist, buckets)
    _draw_bounds(ax_cdf, bounds or {})
    _draw_hist(ax_hist, buckets)
    return _png(fig)


def timeline_png(timeline: Timeline, limit: int = 64) -> bytes:
    """Outstanding async PFs per vCPU over time (max per bin)."""
    fig = _new_figure(9.0, 3.0)
    ax = fig.subplots()
    top = 0
    for label, series in timeline.series.items():
        if not series:
            continue
        t = [i * timeline.bin_us / 1e6 for i in range(len(series) + 1)]
        ax.step(t, [*series, series[-1]], where="post", label=label)
        top = max(top, *series)
    if not timeline.series:
        ax.text(0.5, 0.5, "no vCPU activity", ha="center", va="center", transform=ax.transAxes)
    if top > limit // 2:
        ax.axhline(limit, color="red", linestyle="--", linewidth=1, label=f"limit {limit}")
    ax.set_xlabel(f"trace time (s) from {timeline.t0_us / 1e6:.3f} s; bin {timeline.bin_us} µs")
    ax.set_ylabel("outstanding (max per bin)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if timeline.series:
        ax.legend(fontsize=8, loc="upper right")
    return _png(fig)


def _draw_cdf(ax: Axes, hist: Histogram, buckets: list[Bucket]) -> None:
    xs: list[float] = []
    ys: list[float] = []
    cx: list[float] = []
    cy: list[float] = []
    seen = 0
    for b in buckets:
        seen += b.samples
        x = max(b.high, 1)
        xs.append(x)
        ys.append(seen / hist.count)
        if b.censored:
            cx.append(x)
            cy.append(seen / hist.count)
    ax.step(xs, ys, where="post", color="tab:blue", label="all samples")
    if cx:
        ax.plot(cx, cy, "x", color="red", markersize=8, label="censored (lower bound)")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("latency (µs, log)")
    ax.set_ylabel("fraction ≤ x")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


_BOUND_STYLE = {
    "p10": ("tab:green", 0.10),
    "p99": ("tab:orange", 0.99),
    "max": ("tab:purple", 1.0),
}


def _draw_bounds(ax: Axes, bounds: Mapping[str, int]) -> None:
    for label, value in bounds.items():
        colour, level = _BOUND_STYLE.get(label, ("black", 1.0))
        ax.axvline(value, color=colour, linestyle="--", linewidth=1, label=f"{label} bound")
        ax.plot([value], [level], "o", color=colour, markersize=4)
    if bounds:
        ax.legend(fontsize=8, loc="lower right")


def _draw_hist(ax: Axes, buckets: list[Bucket]) -> None:
    # histogram: log-spaced display bins, summed from the fine buckets
    lo = max(1, buckets[0].low)
    hi = max(buckets[-1].high, lo + 1)
    edges = [float(lo)]
    factor = (hi / lo) ** (1 / 40) if hi > lo else 2.0
    while edges[-1] <= hi:
        edges.append(max(edges[-1] * factor, edges[-1] + 1))
    plain = [0] * (len(edges) - 1)
    cens = [0] * (len(edges) - 1)
    j = 0
    for b in buckets:
        x = max(b.low, lo)
        while j < len(edges) - 2 and x >= edges[j + 1]:
            j += 1
        plain[j] += b.samples - b.censored
        cens[j] += b.censored
    widths = [edges[i + 1] - edges[i] for i in range(len(plain))]
    ax.bar(edges[:-1], plain, width=widths, align="edge", color="tab:blue", label="samples")
    if any(cens):
        ax.bar(
            edges[:-1],
            cens,
            width=widths,
            bottom=plain,
            align="edge",
            color="red",
            label="censored",
        )
    ax.set_xscale("log")
    ax.set_xlabel("latency (µs, log)")
    ax.set_ylabel("samples")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def guest_and_host_png(timeline: Timeline, guest: GuestView) -> bytes:
    """One time axis, seconds since the workload started: the host's longest
    not_present→ready per bin (top) and the guest's touches of 1 ms or more (bottom)."""
    fig = _new_figure(9.0, 4.2)
    ax_host, ax_guest = fig.subplots(2, 1, sharex=True)
    start = guest.start_us if guest.start_us is not None else timeline.t0_us
    bins = timeline.ready_latency_max_us
    xs = [(timeline.t0_us + i * timeline.bin_us - start) / 1e6 for i in range(len(bins))]
    pts = [(x, v) for x, v in zip(xs, bins, strict=True) if v > 0]
    if pts:
        ax_host.plot([p[0] for p in pts], [p[1] for p in pts], ".", markersize=3)
    ax_host.set_ylabel("host: longest\nnot_present→ready (µs)", fontsize=8)
    ax_host.set_yscale("log")
    ax_host.grid(True, which="both", alpha=0.3)
    if guest.stalls:
        ax_guest.plot(
            [t for t, _ in guest.stalls],
            [us for _, us in guest.stalls],
            ".",
            color="tab:red",
            markersize=3,
        )
    else:
        ax_guest.text(
            0.5,
            0.5,
            "no touch of 1 ms or more",
            ha="center",
            va="center",
            transform=ax_guest.transAxes,
        )
    ax_guest.set_ylabel("guest: touches\n≥ 1 ms (µs)", fontsize=8)
    ax_guest.set_yscale("log")
    ax_guest.grid(True, which="both", alpha=0.3)
    where = "the workload-start marker" if guest.start_us is not None else "the first event"
    ax_guest.set_xlabel(
        f"seconds since the workload started ({where}; host bin {timeline.bin_us} µs)"
    )
    return _png(fig)


def overlay_png(metric: str, candidate: Histogram, baseline: Histogram) -> bytes:
    """The CDFs of one metric, candidate runs against baseline runs (samples pooled)."""
    fig = _new_figure(6.5, 3.2)
    ax = fig.subplots()
    for label, hist, colour in (
        ("baseline", baseline, "tab:gray"),
        ("candidate", candidate, "tab:blue"),
    ):
        seen, xs, ys = 0, [], []
        for b in hist.buckets():
            seen += b.samples
            xs.append(max(b.high, 1))
            ys.append(seen / hist.count)
        if xs:
            ax.step(xs, ys, where="post", color=colour, label=f"{label} ({hist.count} samples)")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_title(metric, fontsize=10)
    ax.set_xlabel("latency (µs, log)")
    ax.set_ylabel("fraction ≤ x")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)
