"""The judge (apflab.run.judge) on a real run's record: fixtures/runs/lossy-4k-1, a lab
run with a 4 KB trace buffer that lost events (its CAPTURED.md)."""

import json
import shutil
from pathlib import Path

import pytest

from apflab.run.judge import judge
from apflab.run.records import RunRecord

RUN = Path(__file__).parent / "fixtures" / "runs" / "lossy-4k-1"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / RUN.name
    shutil.copytree(RUN, d)
    return d


def test_a_run_that_lost_events_is_invalid(run_dir: Path) -> None:
    doc = judge(RunRecord.load(run_dir))
    assert doc["verdict"] == "INVALID"
    assert doc["reason"] == "33024 trace events lost (buffer overrun): trace incomplete"
    assert json.loads((run_dir / "verdict.json").read_text())["events"]["lost"] == 33024


def test_the_trace_s_own_loss_marks_count_when_the_counters_say_none(run_dir: Path) -> None:
    # the counters edited to 0: the pages still say 856 events were lost before them
    run_json = run_dir / "run.json"
    doc = json.loads(run_json.read_text())
    doc["trace"]["lost"] = 0
    run_json.write_text(json.dumps(doc))
    verdict = judge(RunRecord.load(run_dir))
    assert verdict["verdict"] == "INVALID"
    assert verdict["events"]["lost"] == 856
