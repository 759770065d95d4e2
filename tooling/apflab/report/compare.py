"""compare.html: a candidate kernel's runs against a baseline's, one self-contained page."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apflab.analysis.stats import Histogram
from apflab.report import plots

_COLOURS = {"PASS": "#1a7f37", "FAIL": "#cf222e", "INCONCLUSIVE": "#9a6700"}


def _e(x: object) -> str:
    return html.escape(str(x))


def render(doc: Mapping[str, Any], overlays: Mapping[str, tuple[Histogram, Histogram]]) -> str:
    colour = _COLOURS.get(doc["verdict"], "#57606a")
    rows = "".join(
        f"<tr><td>{_e(c['metric'])}</td><td>{_e(c['statistic'])}</td>"
        f"<td>{_e(c['verdict'])}</td><td>{_e(c['why'])}</td>"
        f"<td class='num'>{_e(c['candidate'])}</td><td class='num'>{_e(c['baseline'])}</td></tr>"
        for c in doc["changes"]
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>apflab compare</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:75em}"
        ".banner{color:#fff;padding:.8em 1em;border-radius:6px;font-size:1.3em}"
        "td,th{border:1px solid #d0d7de;padding:.25em .6em;font-size:.9em}"
        "table{border-collapse:collapse}img{max-width:100%}</style></head><body>",
        f"<div class='banner' id='verdict' style='background:{colour}'>{_e(doc['verdict'])}"
        f"<br><small>{_e(doc['reason'])}</small></div>",
        "<h2>Per metric (one value per run)</h2><table><tr><th>metric</th><th>statistic</th>"
        "<th>verdict</th><th>why</th><th>candidate runs (µs)</th><th>baseline runs (µs)</th></tr>"
        f"{rows}</table>",
        "<h2>Runs</h2><ul>",
    ]
    for side in ("candidates", "baseline"):
        for r in doc[side]:
            parts.append(
                f"<li>{_e(side)}: {_e(r['kernel'])} {_e(r['verdict'])} — "
                f"<a href='{_e(Path(r['path']).as_uri())}/report.html'>{_e(r['path'])}</a></li>"
            )
    parts.append("</ul><h2>Distributions (samples of all runs pooled)</h2>")
    for metric, (cand, base) in overlays.items():
        png = base64.b64encode(plots.overlay_png(metric, cand, base)).decode()
        parts.append(f"<img alt='{_e(metric)}' src='data:image/png;base64,{png}'>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write(
    out: Path, doc: Mapping[str, Any], overlays: Mapping[str, tuple[Histogram, Histogram]]
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    page = out / "compare.html"
    page.write_text(render(doc, overlays), encoding="utf-8")
    return page
