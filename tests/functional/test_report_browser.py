"""report.html in a real browser: every plot decodes and the verdict is shown.

The report is made from a real lab trace (tests/unit/fixtures/traces/stock-1-full)
and the workload lines of a real run, exactly as a run makes it, then loaded in
Debian's headless Chromium; the page's own load handler counts the images that
decoded (``data-plots="N of M rendered"``), and --dump-dom shows the DOM after it ran.
"""

import re
import shutil
import subprocess
from pathlib import Path

from avocado import Test

from apflab.analysis import verdict
from apflab.analysis.analyzer import analyze_trace
from apflab.analysis.guest import guest_view
from apflab.analysis.model import METRICS
from apflab.analysis.thresholds import Thresholds
from apflab.report import html
from apflab.run.workload import parse_rounds

FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",
)


class ReportInBrowser(Test):
    """
    :avocado: tags=report
    """

    timeout = 300

    def test_plots_render_and_verdict_shows(self) -> None:
        browser = shutil.which("chromium")
        if browser is None:
            self.fail("Debian's chromium is not installed (make deps installs it)")
        assert browser is not None
        trace = FIXTURES / "traces" / "stock-1-full.trace.xz"
        analysis, _ = analyze_trace(trace, {134: 0, 135: 1})
        ev = verdict.Evidence(
            lost_events=0,
            host_swap_out_bytes=1 << 30,
            hyp_before=0,
            hyp_after=analysis.events["ack"],
            apf_enabled=True,
            workload_completed=True,
        )
        th = Thresholds()
        doc = verdict.verdict_document(verdict.judge(analysis, ev, th), analysis, ev, th)
        guest = guest_view(parse_rounds((FIXTURES / "workload" / "tcg-run.jsonl").read_text()))
        doc["guest_view"] = guest.summary()
        out = Path(self.workdir)
        page = html.write_report(out, doc, analysis, guest)
        dom = subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={out / 'profile'}",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        (Path(self.logdir) / "dom.html").write_text(dom)
        expected = len(METRICS) + 2  # one per metric, the guest/host time plot, the timeline
        counted = re.search(r'data-plots="(\d+) of (\d+) rendered"', dom)
        self.assertIsNotNone(counted, "the page's load handler did not run")
        assert counted is not None
        self.assertEqual((int(counted[1]), int(counted[2])), (expected, expected))
        banner = re.search(r'id="verdict"[^>]*>\s*([A-Z]+)', dom)
        self.assertIsNotNone(banner)
        assert banner is not None
        self.assertEqual(banner[1], doc["verdict"])
        self.whiteboard = f"{counted[0]}; verdict {banner[1]}"
