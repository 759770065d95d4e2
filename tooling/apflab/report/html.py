"""report.html: one self-contained page (inline CSS, PNGs as base64 data URIs).

Every text that comes from a run (reasons, details, kernel command lines, hung
task lines) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apflab.analysis.guest import GuestView
from apflab.analysis.model import METRICS, Analysis
from apflab.errors import AnalysisError
from apflab.report import plots

_COLOURS = {"PASS": "#1a7f37", "FAIL": "#cf222e", "INVALID": "#9a6700", "ERROR": "#6e40c9"}
_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #1f2328; max-width: 70em; }
.banner { color: #fff; padding: 0.8em 1em; border-radius: 6px; font-size: 1.3em; }
.banner small { display: block; font-size: 0.7em; margin-top: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left;
         vertical-align: top; font-size: 0.9em; }
th { background: #f6f8fa; }
td.num { text-align: right; font-family: monospace; }
.ok { color: #1a7f37; font-weight: bold; }
.bad { color: #cf222e; font-weight: bold; }
img { max-width: 100%; display: block; margin: 0.3em 0 1em 0; }
code, pre { font-size: 0.85em; }
"""


def _e(value: object) -> str:
    return html.escape("—" if value is None else str(value))


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _kv_table(rows: Mapping[str, Any]) -> str:
    body = "".join(
        f"<tr><th>{_e(k)}</th><td class='num'>{_e(v)}</td></tr>" for k, v in rows.items()
    )
    return f"<table>{body}</table>"


def _latency_table(latency: Mapping[str, Mapping[str, Any]]) -> str:
    cols = ("count", "p50", "p90", "p99", "p999", "max", "censored")
    head = "".join(f"<th>{c}</th>" for c in ("metric (µs)", *cols))
    rows = "".join(
        "<tr><th>"
        + _e(m)
        + "</th>"
        + "".join(f"<td class='num'>{_e(s.get(c))}</td>" for c in cols)
        + "</tr>"
        for m, s in latency.items()
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def _invariants_table(invariants: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for name, inv in invariants.items():
        ok = bool(inv.get("ok"))
        cls, word = ("ok", "ok") if ok else ("bad", "FAILED")
        rows.append(
            f"<tr><td class='{cls}'>{word}</td><th>{_e(name)}</th>"
            f"<td>{_e(inv.get('detail'))}</td></tr>"
        )
    return "<table><tr><th></th><th>invariant</th><th>detail</th></tr>" + "".join(rows) + "</table>"


#: run when the page has loaded: every plot must have decoded (a browser test reads it)
_CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-plots', ok + ' of ' + imgs.length + ' rendered');
});
</script>"""


def render(
    verdict_doc: Mapping[str, Any], analysis: Analysis | None, guest: GuestView | None = None
) -> str:
    """The report page as a string (see :func:`write_report`)."""
    verdict = str(verdict_doc.get("verdict", "ERROR"))
    colour = _COLOURS.get(verdict, "#57606a")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>apflab {_e(verdict)}</title><style>{_CSS}</style>{_CHECK_SCRIPT}</head><body>",
        f"<div class='banner' id='verdict' style='background:{colour}'>{_e(verdict)}"
        f"<small>{_e(verdict_doc.get('reason'))}</small></div>",
    ]
    parts += _tables(verdict_doc)
    if analysis is not None:
        parts += _latency_plots(verdict_doc, analysis)
        parts += _guest_section(verdict_doc, analysis, guest)
        parts += _outstanding(analysis)
    else:
        parts.append("<p>No trace analysis (no trace was captured).</p>")
    extra = {
        k: verdict_doc[k] for k in ("thresholds", "host", "workload", "trace") if verdict_doc.get(k)
    }
    if extra:
        parts.append(
            "<h2>Settings</h2><pre>" + _e(json.dumps(extra, indent=1, default=str)) + "</pre>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _tables(verdict_doc: Mapping[str, Any]) -> list[str]:
    parts = []
    findings = verdict_doc.get("findings") or []
    if len(findings) > 1:
        items = "".join(f"<li>{_e(f)}</li>" for f in findings)
        parts.append(f"<h2>All findings</h2><ol>{items}</ol>")
    kernel = verdict_doc.get("kernel") or {}
    if kernel:
        parts.append("<h2>Kernel</h2>" + _kv_table(kernel))
    parts.append("<h2>Invariants</h2>" + _invariants_table(verdict_doc.get("invariants") or {}))
    events = verdict_doc.get("events") or {}
    parts.append("<h2>Events</h2>" + _kv_table(events))
    guest = {k: v for k, v in (verdict_doc.get("guest") or {}).items() if k != "hung_task_lines"}
    if guest:
        parts.append("<h2>Guest</h2>" + _kv_table(guest))
        lines = (verdict_doc.get("guest") or {}).get("hung_task_lines") or []
        if lines:
            parts.append("<pre>" + _e("\n".join(str(x) for x in lines)) + "</pre>")
    latency = verdict_doc.get("latency_us") or {}
    parts.append("<h2>Latency</h2>" + _latency_table(latency))
    cls = verdict_doc.get("classification") or {}
    quirk = verdict_doc.get("ordering_quirk") or {}
    if cls:
        parts.append(
            "<p>Interrupt/halt path: "
            + _e(cls.get("detail"))
            + f"; {_e(cls.get('interrupt_path_tokens'))} interrupt-path and "
            f"{_e(cls.get('halt_path_tokens'))} halt-path tokens. "
            f"{_e(quirk.get('ack_triggered_ready'))} readies were logged just before the ACK "
            "that dequeued them (kvm_msr is logged after KVM handles the write): counted as "
            "ACK-triggered, not back-to-back.</p>"
        )
    return parts


def _latency_plots(verdict_doc: Mapping[str, Any], analysis: Analysis) -> list[str]:
    parts = []
    th = verdict_doc.get("thresholds") or {}
    keys = (("p10", "latency_p10_us"), ("p99", "latency_p99_us"), ("max", "latency_max_us"))
    for metric in METRICS:
        bounds = {label: th[key][metric] for label, key in keys if metric in (th.get(key) or {})}
        parts.append(f"<h3>{_e(metric)}</h3>")
        png = plots.latency_png(metric, analysis.latency[metric], bounds)
        parts.append(_img(png, metric))
    return parts


def _guest_section(
    verdict_doc: Mapping[str, Any], analysis: Analysis, guest: GuestView | None
) -> list[str]:
    view = verdict_doc.get("guest_view") or {}
    if guest is None or not view:
        return []
    touch = view.get("touch_us") or {}
    keys = ("p50", "p90", "p99", "p999", "max")
    row = "".join(f"<td class='num'>{_e(touch.get(k))}</td>" for k in keys)
    return [
        "<h2>What the guest felt</h2>",
        f"<p>{_e(view.get('touches'))} page touches timed by the workload on the guest's "
        f"clock; {_e(view.get('stalls_1ms'))} took 1 ms or more (longest "
        f"{_e(view.get('longest_stall_us'))} µs).</p>",
        "<table><tr><th>touch latency (µs, bucket top)</th><th>p50</th><th>p90</th>"
        f"<th>p99</th><th>p99.9</th><th>max</th></tr><tr><td>guest</td>{row}</tr></table>",
        _img(plots.guest_and_host_png(analysis.timeline, guest), "guest and host over time"),
    ]


def _outstanding(analysis: Analysis) -> list[str]:
    parts = ["<h2>Outstanding async PFs per vCPU</h2>"]
    parts.append(_img(plots.timeline_png(analysis.timeline), "outstanding per vCPU"))
    if analysis.outstanding_at_end:
        rows = "".join(
            f"<tr><td class='num'>{_e(o.vcpu)}</td><td class='num'>{o.token:#x}</td>"
            f"<td class='num'>{o.age_us / 1e6:.3f}</td><td>{'yes' if o.completed else 'no'}"
            "</td></tr>"
            for o in analysis.outstanding_at_end[:64]
        )
        parts.append(
            "<h3>Tokens never readied (censored)</h3><table><tr><th>vCPU</th><th>token</th>"
            f"<th>age at end (s)</th><th>page completed</th></tr>{rows}</table>"
        )
    return parts


def write_report(
    out_dir: str | Path,
    verdict_doc: Mapping[str, Any],
    analysis: Analysis | None,
    guest: GuestView | None = None,
) -> Path:
    """Write ``out_dir/report.html``: verdict banner and reason, invariants, events,
    latency tables, CDF + histogram per metric (censored samples in red) and the
    outstanding-APF timeline per vCPU.

    :param verdict_doc: the verdict.json document
    :param analysis: the analysis behind it (plots); None when there was no trace
    :param guest: the guest's own touch latencies (the workload's report)
    :returns: the path written
    :raises AnalysisError: the file cannot be written
    """
    out = Path(out_dir) / "report.html"
    page = render(verdict_doc, analysis, guest)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as err:
        raise AnalysisError(f"cannot write the report {out}: {err}") from err
    return out
