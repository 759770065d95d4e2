"""trend.html and trend.xml: kernels night by night, for people and for lab CI.

Plain data in (the store's history rows and the findings as dicts): per kernel,
the verdicts of each night, each watched metric's per-night median and p99 with
the change points marked, and a link to every run's report.html.  The xunit file
has one test case per kernel and night: a new FAIL or a regression that night
fails it.
"""

from __future__ import annotations

import base64
import html
import io
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

_COLOURS = {"PASS": "#1a7f37", "FAIL": "#cf222e", "INVALID": "#9a6700", "ERROR": "#6e40c9"}


def _e(x: object) -> str:
    return html.escape(str(x))


def _nights(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({str(r["night"]) for r in rows if r.get("night") is not None})


def _metric_png(
    metric: str,
    nights: list[str],
    p50: Mapping[str, list[float]],
    p99: Mapping[str, list[float]],
    marks: Sequence[str],
) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(7.5, 2.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    xs = list(range(len(nights)))
    for label, data, style in (
        ("median of runs' p50", p50, "o-"),
        ("median of runs' p99", p99, "s--"),
    ):
        ys = [statistics.median(data[n]) if data.get(n) else float("nan") for n in nights]
        ax.plot(xs, ys, style, markersize=4, label=label)
    for n in marks:
        if n in nights:
            ax.axvline(nights.index(n), color="red", linewidth=1.5, label=f"change point {n}")
    ax.set_xticks(xs, nights, rotation=30, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("µs")
    ax.set_title(metric, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode()


def _kernel_section(
    kernel: str,
    rows: Sequence[Mapping[str, Any]],
    rows99: Sequence[Mapping[str, Any]],
    findings: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
) -> list[str]:
    nights = _nights(rows)
    cells = []
    for n in nights:
        runs = [r for r in rows if r["night"] == n]
        links = " ".join(
            f"<a style='color:{_COLOURS.get(r['verdict'], '#000')}' "
            f"href='{_e(Path(r['results_path']).as_uri())}/report.html'>{_e(r['verdict'])}</a>"
            for r in runs
        )
        cells.append(f"<td>{links}</td>")
    head = "".join(f"<th>{_e(n)}</th>" for n in nights)
    parts = [
        f"<h2>{_e(kernel)}</h2>",
        f"<table><tr><th>night</th>{head}</tr><tr><td>verdicts</td>{''.join(cells)}</tr></table>",
    ]
    for f in findings:
        ids = ", ".join(f["runs"])
        parts.append(f"<p class='finding'>{_e(f['kind'])}: {_e(f['detail'])} (runs {_e(ids)})</p>")
    for metric in metrics:
        p50 = {
            n: [r["metrics"][metric] for r in rows if r["night"] == n and metric in r["metrics"]]
            for n in nights
        }
        p99 = {
            n: [r["metrics"][metric] for r in rows99 if r["night"] == n and metric in r["metrics"]]
            for n in nights
        }
        if not any(p50.values()):
            continue
        marks = [f["first_night"] for f in findings if f.get("metric") == metric]
        png = _metric_png(metric, nights, p50, p99, marks)
        parts.append(f"<img alt='{_e(kernel)} {_e(metric)}' src='data:image/png;base64,{png}'>")
    return parts


def write(
    out: Path,
    history: Sequence[Mapping[str, Any]],
    history_p99: Sequence[Mapping[str, Any]],
    findings: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
) -> tuple[Path, Path]:
    """Write trend.html and trend.xml (xunit) into ``out``."""
    kernels = sorted({str(r["kernel"]) for r in history if r.get("night") is not None})
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>apflab trend</title><style>"
        "body{font-family:sans-serif;margin:1.5em;max-width:80em}td,th{border:1px solid #d0d7de;"
        "padding:.2em .5em;font-size:.85em}table{border-collapse:collapse}"
        ".finding{color:#cf222e;font-weight:bold}img{max-width:100%}</style></head><body>",
        "<h1>apflab: kernels night by night</h1>",
    ]
    if findings:
        items = "".join(
            f"<li>{_e(f['kind'])}: <b>{_e(f['kernel'])}</b> {_e(f['detail'])}</li>"
            for f in findings
        )
        parts.append(f"<h2>Findings</h2><ol id='findings'>{items}</ol>")
    else:
        parts.append("<p id='findings'>No new FAIL and no latency regression.</p>")
    for k in kernels:
        rows = [r for r in history if r["kernel"] == k and r.get("night") is not None]
        rows99 = [r for r in history_p99 if r["kernel"] == k and r.get("night") is not None]
        parts += _kernel_section(
            k, rows, rows99, [f for f in findings if f["kernel"] == k], metrics
        )
    parts.append("</body></html>\n")
    out.mkdir(parents=True, exist_ok=True)
    page = out / "trend.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    xml = out / "trend.xml"
    _xunit(xml, history, findings)
    return page, xml


def _xunit(
    path: Path, history: Sequence[Mapping[str, Any]], findings: Sequence[Mapping[str, Any]]
) -> None:
    cases = sorted(
        {(str(r["kernel"]), str(r["night"])) for r in history if r.get("night") is not None}
    )
    suite = ET.Element("testsuite", name="apflab-nightly", tests=str(len(cases)))
    failures = 0
    for kernel, night in cases:
        case = ET.SubElement(suite, "testcase", classname=kernel, name=night)
        hit = [f for f in findings if f["kernel"] == kernel and f["first_night"] == night]
        runs = [r for r in history if r["kernel"] == kernel and r.get("night") == night]
        fails = [r for r in runs if r["verdict"] == "FAIL"]
        if hit:  # what began tonight first (a new FAIL, a regression)
            failures += 1
            ET.SubElement(case, "failure", message=hit[0]["detail"], type=hit[0]["kind"])
        elif fails:  # still failing: every night it fails is a failure for lab CI
            failures += 1
            message = f"{len(fails)} of {len(runs)} runs FAIL: {fails[0].get('reason')}"
            ET.SubElement(case, "failure", message=message, type="FAIL")
    suite.set("failures", str(failures))
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
