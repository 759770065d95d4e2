"""report.html: self-contained, with the verdict, escaped text and embedded PNGs."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

import pytest

from apflab.analysis import parse, verdict
from apflab.analysis.analyzer import analyze
from apflab.analysis.model import METRICS
from apflab.analysis.thresholds import Thresholds
from apflab.analysis.verdict import Evidence
from apflab.report import html, plots

TRACES = Path(__file__).parent / "fixtures" / "traces"


def test_report_has_verdict_tables_and_embedded_pngs(tmp_path: Path) -> None:
    with parse.open_trace(TRACES / "tiny-noack-1.trace") as f:
        a = analyze(parse.iter_events(f), end_ts_us=119_690_000)
    ev = Evidence(
        lost_events=0,
        host_swap_out_bytes=1 << 27,
        hyp_before=1,
        hung_tasks=("INFO: task memtouch:61 blocked for more than 120 seconds.",),
        apf_enabled=True,
        deadline_passed=True,
        deadline_s=100,
    )
    th = Thresholds()
    v = verdict.judge(a, ev, th)
    doc = verdict.verdict_document(v, a, ev, th, kernel={"cmdline": "console=ttyS0 <b>x</b>"})
    out = html.write_report(tmp_path / "run", doc, a)
    assert out == tmp_path / "run" / "report.html"
    page = out.read_text()
    assert "FAIL" in page
    assert "page-ready never delivered: 5 tokens outstanding for &gt; 106 s" in page
    assert "console=ttyS0 &lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    for name in doc["invariants"]:
        assert name in page
    assert "every_not_present_readied" in page and "FAILED" in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(METRICS) + 1  # one per latency metric + the timeline
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert "0x3d000" in page  # the never-readied tokens are listed
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside


def test_report_without_analysis(tmp_path: Path) -> None:
    doc = verdict.error_document("run-9", "QEMU died <early>")
    page = html.write_report(tmp_path, doc, None).read_text()
    assert "ERROR" in page and "QEMU died &lt;early&gt;" in page
    assert "data:image/png" not in page


def test_plots_draw_empty_and_censored_histograms() -> None:
    a = analyze(parse.iter_events((TRACES / "header-only.trace").read_text().splitlines()))
    for metric in METRICS:
        assert plots.latency_png(metric, a.latency[metric]).startswith(b"\x89PNG")
    assert plots.timeline_png(a.timeline).startswith(b"\x89PNG")


def test_a_debug_log_does_not_get_matplotlibs_font_matching(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A harness that records DEBUG (Avocado) got ~2,100 findfont lines a report, and
    its runner took ~20 s writing them: matplotlib's log is held at WARNING."""
    from matplotlib import font_manager  # noqa: PLC0415

    font_manager.FontManager._findfont_cached.cache_clear()  # as in a fresh process
    a = analyze(parse.iter_events((TRACES / "stock-1-head.trace").read_text().splitlines()))
    with caplog.at_level(logging.DEBUG):
        plots.latency_png("ready_to_ack", a.latency["ready_to_ack"], {"p99": 25_000})
        plots.timeline_png(a.timeline)
    mpl = [r.getMessage() for r in caplog.records if r.name.startswith("matplotlib")]
    assert not mpl, mpl[:3]
